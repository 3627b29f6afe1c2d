"""Knowledge-search throughput: exact search (torch-free) on Ray vs faiss-cpu IndexFlatIP, and an approximate index.

    python benchmarks/search_throughput.py --corpus 120000 --queries 10000 --dim 512 --k 4

k defaults to the geo_time task's ``knowledge_top_k`` (4, also launch/search.py's default). Corpus and
queries are clustered synthetic unit vectors (like real embeddings: an IVF index on uniform random
vectors says nothing). Measured in alternation, one run each, ratios side by side: exact search through
the Ray job's actor pool (2 actors x 1 thread, corpus in the object store; start-up included), then in
one process with 2 threads for every contender (faiss's OpenMP, onnxruntime's intra-op threads, numpy's
BLAS): faiss IndexFlatIP; our exact kernel (int8 products by onnxruntime MatMulInteger, an error bound,
fp32 rescoring; the int8 corpus prepared inside the timed call); the plain numpy kernel (fp32 BLAS
product + ``np.argpartition`` per block); then an IVF index (build time, queries/s, recall@k against
exact); then exact vs faiss flat again on uniform random unit vectors, the hard case for int8 (corpus
prepared once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402

THREADS = 2  # every in-process contender: faiss's OpenMP, onnxruntime's intra-op threads, numpy's BLAS


def clustered(n: int, dim: int, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ray_exact(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(ids, seconds in all, queries/s after the first answered block: actor start-up excluded)."""
    import pyarrow as pa
    import ray

    from serving.extract import tensor_array, tensor_column
    from serving.search import SearchOptions, search_dataset

    blocks = [pa.table({"key": pa.array([str(i) for i in range(start, start + 1000)][: len(queries) - start]),
                        "q": tensor_array(queries[start:start + 1000])}) for start in range(0, len(queries), 1000)]
    options = SearchOptions(k=k, actors=2, threads=1, query_batch_size=1000)
    start = time.perf_counter()
    ids, first, first_rows = {}, None, 0
    for batch in search_dataset(ray.data.from_arrow(blocks), corpus, ["q"], options).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        ids.update(zip(batch["key"].to_pylist(), tensor_column(batch["q_ids"])))
        if first is None:
            first, first_rows = time.perf_counter(), batch.num_rows
    end = time.perf_counter()
    steady = (len(queries) - first_rows) / (end - first) if end > first else float("nan")
    return np.stack([ids[str(i)] for i in range(len(queries))]), end - start, steady


def uniform_case(args, rng: np.random.Generator) -> dict:
    """The hard case for int8 candidates: uniform random unit vectors, scores packed together."""
    import faiss

    from serving.search import QuantizedCorpus, exact_topk

    def unit(n):
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    corpus, queries = unit(args.corpus), unit(args.queries)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(corpus)
    (_, flat_ids), faiss_s = timed(lambda: flat.search(queries, args.k))
    prepared = QuantizedCorpus(corpus, threads=THREADS)
    (_, ids), exact_s = timed(lambda: exact_topk(queries, prepared, args.k))
    return {"faiss_flat_qps": round(args.queries / faiss_s, 1), "exact_in_process_qps": round(args.queries / exact_s, 1),
            "exact_vs_faiss_flat": round(faiss_s / exact_s, 2), "ids_equal_faiss": float((ids == flat_ids).mean()),
            "rows_rescored_per_query": round(prepared.last_stats["rescored"] / args.queries, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=int, default=120_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=4, help="texts per query (geo_time's knowledge_top_k)")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--out", default="/tmp/search_throughput.json")
    args = parser.parse_args()
    import faiss
    import ray
    from threadpoolctl import threadpool_limits

    from serving.extract import init_ray
    from serving.search import IndexOptions, QuantizedCorpus, build_index, exact_topk, fp32_topk, index_search, recall_at_k

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    corpus, queries = clustered(args.corpus, args.dim, centers, rng), clustered(args.queries, args.dim, centers, rng)
    init_ray(num_cpus=2)
    out: dict = {"corpus": args.corpus, "queries": args.queries, "dim": args.dim, "k": args.k, "threads": THREADS,
                 "load_average_at_start": os.getloadavg()}

    ray_ids, seconds, steady = ray_exact(corpus, queries, args.k)
    out["ray_exact_qps"] = round(args.queries / seconds, 1)
    out["ray_exact_qps_after_first_block"] = round(steady, 1)
    ray.shutdown()
    faiss.omp_set_num_threads(THREADS)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(corpus)
    (_, flat_ids), seconds = timed(lambda: flat.search(queries, args.k))
    out["faiss_flat_qps"] = round(args.queries / seconds, 1)
    (_, exact_ids), seconds = timed(lambda: exact_topk(queries, corpus, args.k, threads=THREADS))
    out["exact_in_process_qps"] = round(args.queries / seconds, 1)
    with threadpool_limits(THREADS):
        (_, fp32_ids), seconds = timed(lambda: fp32_topk(queries, corpus, args.k))
    out["numpy_fp32_in_process_qps"] = round(args.queries / seconds, 1)
    prepared = QuantizedCorpus(corpus, threads=THREADS)
    exact_topk(queries, prepared, args.k)
    out["exact_rows_rescored_per_query"] = round(prepared.last_stats["rescored"] / args.queries, 1)
    out["uniform"] = uniform_case(args, rng)
    out["ray_exact_vs_faiss_flat"] = round(out["ray_exact_qps"] / out["faiss_flat_qps"], 2)
    out["ray_exact_after_start_vs_faiss_flat"] = round(steady / out["faiss_flat_qps"], 2)
    out["exact_in_process_vs_faiss_flat"] = round(out["exact_in_process_qps"] / out["faiss_flat_qps"], 2)
    out["numpy_fp32_in_process_vs_faiss_flat"] = round(out["numpy_fp32_in_process_qps"] / out["faiss_flat_qps"], 2)
    out["ray_ids_equal_exact"] = float((ray_ids == exact_ids).mean())
    out["numpy_fp32_ids_equal_exact"] = float((fp32_ids == exact_ids).mean())
    out["faiss_flat_recall"] = recall_at_k(flat_ids, exact_ids)

    ivf_options = IndexOptions(kind="ivf", nlist=args.nlist, nprobe=args.nprobe)
    index, build = timed(lambda: build_index(corpus, ivf_options))
    (_, ivf_ids), seconds = timed(lambda: index_search(index, queries, args.k, ivf_options))
    out["ivf"] = {"nlist": args.nlist, "nprobe": args.nprobe, "build_seconds": round(build, 1),
                  "qps": round(args.queries / seconds, 1), "recall_at_k": round(recall_at_k(ivf_ids, exact_ids), 4)}
    out["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
