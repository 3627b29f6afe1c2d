"""Knowledge search with Ray: embed a corpus with an export's text tower, top-k for every query embedding.

* The corpus (one text per line, CSV or JSONL: :func:`read_corpus`) is embedded in batches by a pool of
  actors that each open the export's text tower once (``serving.infer.ExportedModel``, onnxruntime).
  The embeddings are kept in ``<out>`` and reused while the corpus and the text tower are unchanged.
* Queries are columns of an extraction output (``serving.extract``): the image embedding [D] or a head's
  tokens [K, D]. The driver reads their Parquet parts; a pool of search actors holds the corpus (one copy
  per node, from the object store) and answers blocks of queries.
* Exact search by default, the same result as ``training.knowledge.search`` (ties to the lower corpus
  id): a blocked int8 matrix product (onnxruntime ``MatMulInteger``) and an error bound on the
  quantisation rule out rows, fp32 rescores the rest (``QuantizedCorpus``). A FAISS index (flat, IVF or
  HNSW) is an option; its recall@k against exact search is measured on a sample of queries and recorded.

No torch: this module and its actors import numpy, onnxruntime, pyarrow, ray (and faiss for an index).

Output (``<out>/``), the format relevance training can read:

* ``results/*.parquet``: one row per sample: ``key`` and, for each query column ``C``, ``C_ids``
  (int64) and ``C_scores`` (float32) of shape ``[*query_shape[:-1], k]``, best first; ids are row
  positions in ``read_corpus(corpus, text_column)``;
* ``corpus_embeddings.npy``: the corpus embeddings [N, D] (float32, normalised), row = id, and
  ``corpus_embeddings.key.json``: the corpus sha256 and text-tower fingerprint they were made with;
* ``manifest.json``: corpus path, sha256 and size, encoder identity and text-tower fingerprint, the
  extraction it searched, k, index and its recall@k, counts and speed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.extract import MANIFEST, EncoderSpec, driver_progress_only, tensor_array, tensor_column
from shards.atomic import replacing_dir, save_npy, write_json
from shards.corpus import read_corpus
from shards.progress import progress_bar

LOGGER = logging.getLogger("multiclip.search")
RESULTS = "results"
SEARCH_MARKER = "search.json"  # written first: this folder is a knowledge-search output
RESULTS_MARKER = ".multiclip-search-results"  # inside results/: the parts there are this tool's
CORPUS_EMBEDDINGS = "corpus_embeddings.npy"
CORPUS_KEY = "corpus_embeddings.key.json"  # what the embeddings were made from: corpus sha256 + text-tower fingerprint
INDEX_KINDS = ("exact", "flat", "ivf", "hnsw")


# --------------------------------------------------------------------------- the search kernels


def exact_topk(queries: np.ndarray, corpus, k: int, block_size: int = 16384,
               threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores [Q, k], ids [Q, k]), best first, ties to the lower id.

    Same contract as ``training.knowledge.search``. ``corpus`` is an array or a ``QuantizedCorpus``
    (an actor prepares it once). Still exact, but most of the work is an int8 matrix product: see
    ``QuantizedCorpus``. ``threads``: onnxruntime threads of that product for an array corpus (0: one
    per physical core; a ``QuantizedCorpus`` keeps its own).
    """
    prepared = corpus if isinstance(corpus, QuantizedCorpus) else QuantizedCorpus(corpus, threads=threads)
    if prepared.size == 0:
        raise ValueError("cannot search an empty corpus")
    return prepared.search(np.ascontiguousarray(queries, np.float32), min(k, prepared.size), block_size)


class QuantizedCorpus:
    """The corpus in fp32 and as int8 (one symmetric scale), for exact search by int8 candidates.

    For a query q and corpus row x with quantised q', x': |q.x - q'.x'| <= |q - q'| |x| + |q'| |x - x'|
    =: eps(q), using the largest |x| and |x - x'| over the corpus; q'.x' is exact (int32 products, by
    onnxruntime's ``MatMulInteger``). Each query keeps a lower bound L of its true k-th score: first the
    k-th fp32 score of k rows picked by their int8 products, then the k-th of its running top-k. A row
    with q'.x' + eps < L cannot enter the top-k; every other row is rescored in fp32 and merged into the
    running top-k (ties to the lower id), so the answer is exact whatever the data. ``last_stats``
    counts the queries and the rows rescored in fp32.
    """

    seed_group = 64  # the first block's products are read in groups of this many rows to seed the bound

    def __init__(self, corpus: np.ndarray, threads: int = 0):
        self.fp32 = np.ascontiguousarray(corpus, np.float32)  # a read-only corpus from the object store is not copied
        self.size, self.dim = self.fp32.shape
        self.scale = (max(float(self.fp32.max()), -float(self.fp32.min())) / 127 if self.size else 0.0) or 1.0
        self.int8 = np.empty(self.fp32.shape, np.int8)
        self.max_norm = self.max_residual = 0.0
        for start in range(0, self.size, 8192):  # in chunks: no corpus-sized temporaries
            rows = self.fp32[start:start + 8192]
            self.int8[start:start + 8192], residual = _quantize(rows, np.float32(self.scale))
            self.max_norm = max(self.max_norm, float(np.sqrt(np.einsum("nd,nd->n", rows, rows).max())))
            self.max_residual = max(self.max_residual, float(np.sqrt(np.einsum("nd,nd->n", residual, residual).max())))
        self.threads = threads  # onnxruntime intra-op threads of the int8 product (0: one per physical core)
        self._blocks: dict[int, list[np.ndarray]] = {}
        self.last_stats: dict[str, int] = {}

    def blocks(self, block_size: int) -> list[np.ndarray]:
        """The int8 corpus as contiguous [D, block] slices (MatMulInteger's right-hand side)."""
        if block_size not in self._blocks:
            self._blocks[block_size] = [np.ascontiguousarray(self.int8[start:start + block_size].T)
                                        for start in range(0, self.size, block_size)]
        return self._blocks[block_size]

    def search(self, q: np.ndarray, k: int, block_size: int, query_block: int = 1024):
        stats = {"queries": len(q), "rescored": 0}
        parts = [self._search_block(q[start:start + query_block], k, block_size, stats)
                 for start in range(0, len(q), query_block)]
        self.last_stats = stats
        if not parts:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_block(self, q: np.ndarray, k: int, block_size: int, stats: dict):
        q_scale = np.maximum(np.abs(q).max(axis=1), 1e-30) / 127
        q_int8, q_residual = _quantize(q, q_scale[:, None].astype(np.float32))
        unit = q_scale.astype(np.float64) * self.scale  # score per unit of int8 product
        eps = (np.linalg.norm(q_residual, axis=1).astype(np.float64) * self.max_norm
               + np.linalg.norm(q - q_residual, axis=1).astype(np.float64) * self.max_residual + 1e-5)
        shifted = (q_int8.astype(np.int16) + 128).astype(np.uint8)  # MatMulInteger's uint8 side, zero point 128
        matmul = _int8_matmul(self.threads)
        best_scores = np.full((len(q), k), -np.inf, np.float32)
        best_ids = np.full((len(q), k), np.iinfo(np.int64).max, np.int64)
        floor = None
        for number, block in enumerate(self.blocks(block_size)):
            start = number * block_size
            products = matmul.run(None, {"a": shifted, "b": block})[0]
            if floor is None:  # k real rows: the k-th of their fp32 scores bounds the true k-th from below
                if products.shape[1] >= k:
                    seeds = self._seeds(products, k) + start
                    bound = np.einsum("qd,qkd->qk", q, self.fp32[seeds]).min(axis=1)
                else:  # a first block narrower than k: no bound yet, every row is rescored
                    bound = np.full(len(q), -np.inf)
                floor = _int_floor((bound - eps) / unit)
            rows, cols = np.divmod(np.flatnonzero(products >= floor[:, None]), products.shape[1])
            if len(rows):
                stats["rescored"] += len(rows)
                scores = np.einsum("nd,nd->n", q[rows], self.fp32[cols + start])
                best_scores, best_ids = _merge(best_scores, best_ids, rows, scores, cols + start)
                bound = np.maximum(bound, best_scores[:, -1])
                floor = _int_floor((bound - eps) / unit)
        return best_scores, best_ids

    def _seeds(self, products: np.ndarray, k: int) -> np.ndarray:
        """Per query, k distinct columns with large products: each group's best of the k best groups."""
        n, group = products.shape[1], self.seed_group
        if n // group < k:
            return np.argpartition(products, n - k, axis=1)[:, n - k:]
        grouped = products[:, : n // group * group].reshape(len(products), -1, group)
        top_groups = np.argpartition(grouped.max(axis=2), grouped.shape[1] - k, axis=1)[:, -k:]
        within = np.take_along_axis(grouped, top_groups[:, :, None], axis=1).argmax(axis=2)
        return top_groups * group + within


def _quantize(x: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp32 residual x - scale * int8)."""
    values = np.clip(np.rint(x / scale), -127, 127)
    return values.astype(np.int8), (x - values * scale).astype(np.float32)


def _int_floor(x: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(x, -2.0**31, 2.0**31 - 1)).astype(np.int32)


def _merge(best_scores, best_ids, rows, scores, ids):
    """Each query's best k of its running top-k and new (row, score, id) candidates, by (-score, id)."""
    q, k = best_scores.shape
    rows = np.concatenate([np.repeat(np.arange(q), k), rows])
    scores = np.concatenate([best_scores.reshape(-1), scores.astype(np.float32)])
    ids = np.concatenate([best_ids.reshape(-1), ids.astype(np.int64)])
    order = np.lexsort((ids, -scores, rows))
    first = np.searchsorted(rows[order], np.arange(q))  # every query has >= k entries: its running top-k
    take = order[(first[:, None] + np.arange(k)).reshape(-1)]
    return scores[take].reshape(q, k), ids[take].reshape(q, k)


_SESSIONS: dict[int, Any] = {}


def _int8_matmul(threads: int):
    """An onnxruntime session of one MatMulInteger node: uint8 [Q, D] (zero point 128) x int8 [D, N] -> int32."""
    if threads not in _SESSIONS:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        node = helper.make_node("MatMulInteger", ["a", "b", "a_zero_point"], ["y"])
        graph = helper.make_graph(
            [node], "int8_products",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, ["queries", "dim"]),
             helper.make_tensor_value_info("b", TensorProto.INT8, ["dim", "rows"])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, ["queries", "rows"])],
            initializer=[helper.make_tensor("a_zero_point", TensorProto.UINT8, [], [128])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        _SESSIONS[threads] = ort.InferenceSession(model.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"])
    return _SESSIONS[threads]


def fp32_topk(q: np.ndarray, c: np.ndarray, k: int, block_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a blocked fp32 product (numpy's BLAS) and ``np.argpartition`` per block.

    The plain kernel, kept as a reference and as the benchmark's fp32 contender; rows tied with a
    block's k-th score all go to the merge, so ties still go to the lower id.
    """
    q, c = np.ascontiguousarray(q, np.float32), np.ascontiguousarray(c, np.float32)
    k = min(k, len(c))
    best_scores = np.full((len(q), k), -np.inf, np.float32)
    best_ids = np.full((len(q), k), np.iinfo(np.int64).max, np.int64)
    for start in range(0, len(c), block_size):
        scores = q @ c[start:start + block_size].T
        take = min(k, scores.shape[1])
        kth = np.partition(scores, scores.shape[1] - take, axis=1)[:, scores.shape[1] - take]
        rows, cols = np.divmod(np.flatnonzero(scores >= np.maximum(kth, best_scores[:, -1])[:, None]), scores.shape[1])
        best_scores, best_ids = _merge(best_scores, best_ids, rows, scores[rows, cols], cols + start)
    return best_scores, best_ids


@dataclass(frozen=True)
class IndexOptions:
    kind: str = "exact"  # exact | flat | ivf | hnsw
    nlist: int | None = None  # IVF lists (default 4 * sqrt(N))
    nprobe: int = 16  # IVF lists visited per query
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_search: int = 128  # HNSW candidate list at query time


def build_index(corpus: np.ndarray, options: IndexOptions):
    """A FAISS inner-product index over the corpus (normalised vectors: inner product = cosine)."""
    import faiss

    corpus = np.ascontiguousarray(corpus, np.float32)
    dim = corpus.shape[1]
    if options.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif options.kind == "ivf":
        nlist = options.nlist or max(1, min(corpus.shape[0] // 39, int(4 * np.sqrt(corpus.shape[0]))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(corpus)
    elif options.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index {options.kind!r}; known: {INDEX_KINDS}")
    index.add(corpus)
    return index


def index_search(index, queries: np.ndarray, k: int, options: IndexOptions) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    if options.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = options.nprobe
    if options.kind == "hnsw":
        index.hnsw.efSearch = max(options.ef_search, k)
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
    return scores, ids.astype(np.int64)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by the approximate search."""
    hits = [len(set(a) & set(e)) / len(e) for a, e in zip(approx_ids.tolist(), exact_ids.tolist())]
    return float(np.mean(hits)) if hits else float("nan")


# --------------------------------------------------------------------------- Ray actors


class TextEmbedder:
    """Ray Data callable class: embeds batches of corpus texts with the export's text tower (onnxruntime)."""

    def __init__(self, encoder: EncoderSpec, threads: int = 1):
        from serving.infer import ExportedModel

        self.model = ExportedModel(encoder.path, encoder.runtime_options(threads))  # one per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "embedding": self.model.text_embeddings([str(t) for t in batch["text"]])}


class Searcher:
    """Ray Data callable class: holds the corpus (or a FAISS index of it), answers blocks of queries."""

    def __init__(self, corpus_ref, k: int, columns: list[str], index: IndexOptions, index_ref=None,
                 threads: int = 1):
        import ray

        self.corpus = ray.get(corpus_ref[0])  # zero-copy from the node's object store
        self.prepared = QuantizedCorpus(self.corpus, threads=threads) if index_ref is None else None
        self.k, self.columns, self.index_options = k, columns, index
        self.index = None
        if index_ref is not None:
            import faiss

            faiss.omp_set_num_threads(threads)
            self.index = faiss.deserialize_index(ray.get(index_ref[0]))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return exact_topk(queries, self.prepared, self.k)
        return index_search(self.index, queries, self.k, self.index_options)

    def __call__(self, table):
        import pyarrow as pa

        out = {"key": table["key"]}
        for column in self.columns:
            queries = tensor_column(table[column])
            shape = queries.shape[:-1]
            scores, ids = self.search(queries.reshape(-1, queries.shape[-1]))
            out[f"{column}_ids"] = _int_tensor_array(ids.reshape(*shape, -1))
            out[f"{column}_scores"] = tensor_array(scores.reshape(*shape, -1))
        return pa.table(out)


def _int_tensor_array(values: np.ndarray):
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values, np.int64).reshape(-1))
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class SearchOptions:
    k: int = 4  # texts per query
    actors: int | None = None  # embedding / search actors (default: the cluster's CPUs)
    actor_cpus: float = 1.0
    threads: int = 1  # onnxruntime / faiss threads per actor
    text_batch_size: int = 256  # corpus texts per actor call
    query_batch_size: int = 1024  # samples per search call
    recall_sample: int = 1000  # queries used to measure an index's recall@k against exact
    index: IndexOptions = IndexOptions()


def default_actors(actor_cpus: float) -> int:
    import ray

    return max(1, int(float(ray.cluster_resources().get("CPU", 1)) // actor_cpus))


def embed_corpus(encoder: EncoderSpec, texts: list[str], options: SearchOptions) -> np.ndarray:
    """Corpus embeddings [N, D] in corpus order, by a pool of actors each running the export's text tower."""
    import ray

    actors = options.actors or default_actors(options.actor_cpus)
    driver_progress_only()  # before the dataset exists: it copies the context
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(TextEmbedder, batch_size=options.text_batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"encoder": encoder, "threads": options.threads},
                        compute=ray.data.ActorPoolStrategy(size=min(actors, max(1, len(texts) // 64) or 1)),
                        num_cpus=options.actor_cpus)
    ids, parts = [], []
    with progress_bar(total=len(texts), desc="corpus", unit="text") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids.append(batch["id"])
            parts.append(batch["embedding"])
            bar.update(len(batch["id"]))
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(parts)[order].astype(np.float32)


def cached_corpus(out_dir: Path, key: dict[str, Any]) -> np.ndarray | None:
    """The corpus embeddings of an earlier search into ``out_dir`` when corpus and text tower are the same."""
    path, key_file = out_dir / CORPUS_EMBEDDINGS, out_dir / CORPUS_KEY
    if path.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return np.load(path)
    return None


def search_dataset(ds, corpus: np.ndarray, columns: list[str], options: SearchOptions, index=None):
    """Map a Ray dataset of query rows (``key`` + tensor columns) to result rows, across actors."""
    import faiss
    import ray

    corpus_ref = [ray.put(np.ascontiguousarray(corpus, np.float32))]  # in a list: passed as a ref, not resolved
    index_ref = [ray.put(faiss.serialize_index(index))] if index is not None else None
    actors = options.actors or default_actors(options.actor_cpus)
    return ds.map_batches(Searcher, batch_size=options.query_batch_size, batch_format="pyarrow",
                          fn_constructor_kwargs={"corpus_ref": corpus_ref, "k": options.k, "columns": columns,
                                                 "index": options.index, "index_ref": index_ref,
                                                 "threads": options.threads},
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=options.actor_cpus)


def measure_recall(corpus: np.ndarray, queries: np.ndarray, index, options: SearchOptions) -> float:
    sample = queries[: options.recall_sample]
    _, exact_ids = exact_topk(sample, corpus, options.k)
    _, approx_ids = index_search(index, sample, options.k, options.index)
    return recall_at_k(approx_ids, exact_ids)


def search_extraction(extraction: str | Path, corpus_path: str | Path, out_dir: str | Path, encoder: EncoderSpec,
                      columns: list[str], options: SearchOptions = SearchOptions(),
                      text_column: str = "text", overwrite: bool = False) -> dict[str, Any]:
    """Top-k corpus texts for every query column of an extraction output; returns the manifest.

    Args:
        extraction: output folder of ``serving.extract.extract``.
        corpus_path: one text per line, CSV or JSONL (``text_column``).
        out_dir: where results, corpus embeddings and the manifest go.
        encoder: the export folder whose text tower embeds the corpus (``EncoderSpec("onnx", export_dir)``,
            the spec the extraction used); corpus embeddings are reused from ``out_dir`` when corpus and
            text tower (:meth:`EncoderSpec.text_fingerprint`) are unchanged.
        columns: query columns of the extraction ([..., D] each).
        overwrite: write into a non-empty folder that is not a search output (see :func:`claim_search_output`).

    Returns:
        The manifest written to ``<out_dir>/manifest.json``.

    Needs Ray initialised (``serving.extract.init_ray``).
    """
    import pyarrow.parquet as pq
    import ray

    if encoder.kind != "onnx":
        raise ValueError(f"the corpus is embedded by an export folder's text tower (EncoderSpec('onnx', ...)), "
                         f"not a {encoder.kind!r} encoder")
    extraction, out_dir = Path(extraction), Path(out_dir)
    extracted = json.loads((extraction / MANIFEST).read_text())
    missing = [c for c in columns if c not in extracted["columns"]]
    if missing:
        raise ValueError(f"{extraction}: no column(s) {missing}; columns: {sorted(extracted['columns'])}")
    started = time.perf_counter()
    texts = read_corpus(corpus_path, text_column)
    tower = encoder.text_fingerprint()
    key = {"corpus_sha256": hashlib.sha256(Path(corpus_path).read_bytes()).hexdigest(), "text_column": text_column,
           "text_fingerprint": tower}
    claim_search_output(out_dir, extraction, overwrite)
    corpus = cached_corpus(out_dir, key)
    reused = corpus is not None
    if corpus is None:
        corpus = embed_corpus(encoder, texts, options)
        save_npy(out_dir / CORPUS_EMBEDDINGS, corpus)
        write_json(out_dir / CORPUS_KEY, key)
    embedded = time.perf_counter()
    LOGGER.info("corpus: %d texts %s in %.1f s", len(texts), "reused" if reused else "embedded", embedded - started)
    index = build_index(corpus, options.index) if options.index.kind != "exact" else None
    parts = [str(extraction / p) for p in extracted["parts"]]
    driver_progress_only()
    ds = ray.data.from_arrow(query_tables(parts, columns))
    with replacing_dir(out_dir / RESULTS, RESULTS_MARKER, overwrite=True) as results, \
            progress_bar(total=extracted["samples"], desc="search", unit="sample") as bar:  # swapped in whole
        for i, batch in enumerate(search_dataset(ds, corpus, columns, options, index).iter_batches(
                batch_size=None, batch_format="pyarrow")):
            pq.write_table(batch, results / f"part-{i:05d}.parquet")
            bar.update(batch.num_rows)
        (results / RESULTS_MARKER).write_text("written by serving.search\n")
    seconds = time.perf_counter() - embedded
    queries = sum(int(np.prod(extracted["columns"][c][:-1] or [1])) for c in columns) * extracted["samples"]
    manifest = {
        "corpus": {"path": str(Path(corpus_path).resolve()), "text_column": text_column, "texts": len(texts),
                   "sha256": key["corpus_sha256"], "embeddings_reused": reused},
        "encoder": {**encoder.describe(), "text_fingerprint": tower},
        "extraction": {"path": str(extraction.resolve()), "encoder": extracted["encoder"],
                       "samples": extracted["samples"]},
        "columns": {c: [*extracted["columns"][c][:-1], options.k] for c in columns},
        "k": options.k, "index": asdict(options.index),
        "recall_at_k": None if index is None else measure_recall(
            corpus, _first_queries(parts, columns[0], options.recall_sample), index, options),
        "queries": queries, "search_seconds": round(seconds, 2),
        "queries_per_s": round(queries / seconds, 1) if seconds > 0 else None,
        "corpus_embed_seconds": round(embedded - started, 2),
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def claim_search_output(out_dir: Path, extraction: Path, overwrite: bool) -> None:
    """Make ``out_dir`` this search's (``search.json``) before any work. The extraction's own folder is
    refused (its manifest would be overwritten), and so is a non-empty folder without ``search.json``
    unless ``overwrite``; even then only this tool's files are replaced (``results/`` must carry the
    results marker), nothing else is deleted."""
    if out_dir.resolve() == extraction.resolve():
        raise ValueError(f"--out {out_dir} is the extraction folder (--queries): its manifest would be overwritten; "
                         "write the search elsewhere")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SEARCH_MARKER).is_file() and not overwrite:
        raise FileExistsError(f"{out_dir}: not empty and has no {SEARCH_MARKER} (not a search output); choose another "
                              "--out, or --overwrite to write this tool's files into it")
    results = out_dir / RESULTS
    if results.is_dir() and any(results.iterdir()) and not (results / RESULTS_MARKER).is_file():
        raise FileExistsError(f"{results}: exists, is not empty and has no {RESULTS_MARKER} (not written by this "
                              "tool); choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SEARCH_MARKER, {"written_by": "serving.search", "extraction": str(extraction.resolve())})


def query_tables(parts: list[str], columns: list[str]) -> list:
    """The query columns of every non-empty part, read by the driver.

    Read here rather than by Ray read tasks: a full actor pool leaves no CPU for read and write tasks
    on a small machine, and the query embeddings are small next to the images they came from.
    """
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["key", *columns]) for p in parts]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise ValueError(f"no query rows in {len(parts)} part(s)")
    return tables


def _first_queries(parts: list[str], column: str, n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    out, have = [], 0
    for part in parts:
        table = pq.read_table(part, columns=[column])
        if table.num_rows:
            q = tensor_column(table[column])
            out.append(q.reshape(-1, q.shape[-1]))
            have += len(out[-1])
        if have >= n:
            break
    return np.concatenate(out)[:n]


def read_results(out_dir: str | Path, column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{sample key: (ids, scores)} of one query column, each [*query_shape[:-1], k]."""
    import pyarrow.parquet as pq

    result = {}
    for path in sorted((Path(out_dir) / RESULTS).glob("*.parquet")):
        table = pq.read_table(path)
        if table.num_rows == 0:
            continue
        ids, scores = tensor_column(table[f"{column}_ids"]), tensor_column(table[f"{column}_scores"])
        for key, i, s in zip(table["key"].to_pylist(), ids, scores):
            result[key] = (i, s)
    return result
