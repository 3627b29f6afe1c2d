"""Knowledge search with Ray: embed a corpus with the text tower, top-k for every query embedding.

* The corpus (``training.knowledge.read_corpus``: one text per line, CSV or JSONL) is embedded in
  batches by a pool of actors that each load the run's encoder once.
* Queries are columns of an extraction output (``serving.extract``): the image embedding [D] or the
  geo_time [CLS] embeddings [K, D]. Ray Data reads the Parquet parts; a pool of search actors holds
  the corpus (one copy per node, from the object store) and answers blocks of queries.
* Exact search by default, the same result as ``training.knowledge.search`` (ties to the lower corpus
  id): a blocked int8 matrix product picks candidates, fp32 rescores them, and an error bound proves
  that no other row can enter the top-k (``QuantizedCorpus``). A FAISS index (flat, IVF or HNSW) is an
  option; its recall@k against exact search is measured on a sample of queries and recorded.

Output (``<out>/``), the format geo_time relevance training can read:

* ``results/*.parquet``: one row per sample: ``key`` and, for each query column ``C``, ``C_ids``
  (int64) and ``C_scores`` (float32) of shape ``[*query_shape[:-1], k]``, best first; ids are row
  positions in ``read_corpus(corpus, text_column)``;
* ``corpus_embeddings.npy``: the corpus embeddings [N, D] (float32, normalised), row = id;
* ``manifest.json``: corpus path, sha256 and size, encoder identity and text-tower fingerprint, the
  extraction it searched, k, index and its recall@k, counts and speed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.extract import MANIFEST, EncoderSpec, tensor_array, tensor_column

LOGGER = logging.getLogger("multiclip.search")
RESULTS = "results"
CORPUS_EMBEDDINGS = "corpus_embeddings.npy"
INDEX_KINDS = ("exact", "flat", "ivf", "hnsw")


# --------------------------------------------------------------------------- the search kernels


def exact_topk(queries: np.ndarray, corpus, k: int, block_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores [Q, k], ids [Q, k]), best first, ties to the lower id.

    Same contract as ``training.knowledge.search``. ``corpus`` is an array or a ``QuantizedCorpus``
    (an actor prepares it once). Still exact, but most of the work is an int8 matrix product: see
    ``QuantizedCorpus``.
    """
    prepared = corpus if isinstance(corpus, QuantizedCorpus) else QuantizedCorpus(corpus)
    if prepared.size == 0:
        raise ValueError("cannot search an empty corpus")
    return prepared.search(np.ascontiguousarray(queries, np.float32), min(k, prepared.size), block_size)


class QuantizedCorpus:
    """The corpus in fp32 and as int8 (one symmetric scale), for exact search by int8 candidates.

    For a query q and corpus row x with quantised q', x': |q.x - q'.x'| <= |q - q'| |x| + |q'| |x - x'|
    =: eps(q), using the largest |x| and |x - x'| over the corpus; q'.x' is exact (int32 products).
    Pass 1 takes each query's 64 best rows by q'.x' and rescores them in fp32: their k-th score s_k
    is a lower bound of the true k-th. If every other row has q'.x' + eps < s_k, the answer is
    certified. Otherwise pass 2 rescores every row with q'.x' + eps >= s_k, which holds the whole
    true top-k. ``last_stats`` counts the queries each pass settled.
    """

    candidates = 64  # pass 1: int8 candidates per query rescored in fp32
    max_pass2_rows = 4096  # pass 2 rows per query before that query falls back to a plain fp32 search

    def __init__(self, corpus: np.ndarray):
        self.fp32 = _as_tensor(corpus)
        self.size = self.fp32.shape[0]
        self.scale = (float(self.fp32.abs().max()) / 127 if self.size else 0.0) or 1.0
        self.int8, residual = _quantize(self.fp32, self.scale)
        self.max_norm = float(self.fp32.norm(dim=1).max()) if self.size else 0.0
        self.max_residual = float(residual.norm(dim=1).max()) if self.size else 0.0
        self.last_stats = {}

    def search(self, q: np.ndarray, k: int, block_size: int, query_block: int = 256):
        stats = {"pass1": 0, "pass2": 0, "fp32": 0}
        parts = [self._search_block(q[start:start + query_block], k, block_size, stats)
                 for start in range(0, len(q), query_block)]
        self.last_stats = stats
        if not parts:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def products(self, q_int8, start: int, block_size: int):
        import torch

        return torch._int_mm(q_int8, self.int8[start:start + block_size].T)

    def _search_block(self, q: np.ndarray, k: int, block_size: int, stats: dict):
        import torch

        query = torch.from_numpy(q)
        q_scale = (query.abs().amax(dim=1).clamp_min(1e-30) / 127)[:, None]
        q_int8, q_residual = _quantize(query, q_scale)
        unit = q_scale.double().squeeze(1) * self.scale  # score per unit of int8 product
        eps = (q_residual.norm(dim=1).double() * self.max_norm
               + (query - q_residual).norm(dim=1).double() * self.max_residual + 1e-5)
        m = min(self.candidates, self.size)
        best, best_ids = torch.empty((len(q), 0), dtype=torch.int32), torch.empty((len(q), 0), dtype=torch.long)
        for start in range(0, self.size, block_size):
            top, top_ids = self.products(q_int8, start, block_size).topk(min(m, self.size - start, block_size), dim=1)
            best, best_ids = torch.cat([best, top], 1), torch.cat([best_ids, top_ids + start], 1)
            keep = best.topk(min(m, best.shape[1]), dim=1).indices
            best, best_ids = best.gather(1, keep), best_ids.gather(1, keep)
        scores, ids = _merge(torch.einsum("qd,qmd->qm", query, self.fp32[best_ids]), best_ids, k)
        # Every row outside the candidates has an int8 product <= the smallest candidate's:
        certified = (best.min(dim=1).values.double() * unit + eps < scores[:, -1].double()) | (m >= self.size)
        scores, ids = scores.numpy(), ids.numpy()
        stats["pass1"] += int(certified.sum())
        rest = torch.nonzero(~certified).squeeze(1)
        if len(rest):
            floor = torch.floor((torch.from_numpy(scores[rest.numpy(), -1]).double() - eps[rest]) / unit[rest])
            found = self._pass2(query[rest], q_int8[rest], floor.clamp(-2**31, 2**31 - 1).to(torch.int32), k, block_size)
            for row, (row_scores, row_ids) in zip(rest.tolist(), found):
                if row_scores is None:  # too many near-ties for the bound: a plain fp32 search
                    row_scores, row_ids = _fp32_topk(q[row:row + 1], self.fp32, k, block_size)
                    stats["fp32"] += 1
                else:
                    stats["pass2"] += 1
                scores[row], ids[row] = row_scores, row_ids
        return scores, ids

    def _pass2(self, query, q_int8, floor, k: int, block_size: int):
        """Per query: (scores, ids) of the exact top-k among rows with q'.x' >= floor, or (None, None)."""
        import torch

        rows, cols = [], []
        for start in range(0, self.size, block_size):
            row, col = torch.nonzero(self.products(q_int8, start, block_size) >= floor[:, None], as_tuple=True)
            rows.append(row)
            cols.append(col + start)
        rows, cols = torch.cat(rows), torch.cat(cols)
        counts = torch.bincount(rows, minlength=len(query))
        found = []
        for i, row_cols in enumerate(torch.split(cols[torch.argsort(rows, stable=True)], counts.tolist())):
            if len(row_cols) > self.max_pass2_rows:
                found.append((None, None))
                continue
            row_scores, row_ids = _merge((self.fp32[row_cols] @ query[i])[None], row_cols[None], k)
            found.append((row_scores[0].numpy(), row_ids[0].numpy()))
        return found


def _quantize(x, scale):
    """(int8 values, fp32 residual x - scale * int8)."""
    import torch

    values = torch.round(x / scale).clamp_(-127, 127)
    return values.to(torch.int8), x - values * scale


def _as_tensor(values: np.ndarray):
    """A float32 tensor over the array without a copy (a read-only corpus from the object store is never written)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(values, np.float32))


def _fp32_topk(q: np.ndarray, c, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a blocked fp32 product with a running top-k (the reference and the fallback)."""
    import torch

    q = torch.from_numpy(q)
    best_scores = torch.empty((q.shape[0], 0))
    best_ids = torch.empty((q.shape[0], 0), dtype=torch.long)
    for start in range(0, c.shape[0], block_size):
        scores = q @ c[start:start + block_size].T
        take = min(k + 1, scores.shape[1])
        top_scores, top_ids = scores.topk(take, dim=1)
        if take > k and q.shape[0] and bool((top_scores[:, k] == top_scores[:, k - 1]).any()):
            tied = int((scores >= top_scores[:, k - 1:k]).sum(dim=1).max())  # keep every tie at the k-th
            top_scores, top_ids = scores.topk(tied, dim=1)
        best_scores, best_ids = _merge(torch.cat([best_scores, top_scores], 1),
                                       torch.cat([best_ids, top_ids + start], 1), k)
    return best_scores.numpy(), best_ids.numpy()


def _merge(scores, ids, k: int):
    """Best k of candidate (score, id) pairs by (-score, id)."""
    import torch

    order = torch.sort(ids, dim=1, stable=True).indices
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, top), ids.gather(1, top)


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
    """Ray Data callable class: embeds batches of corpus texts with the run's text tower."""

    def __init__(self, encoder: EncoderSpec, torch_threads: int = 1):
        import training  # noqa: F401
        import torch

        torch.set_num_threads(torch_threads)
        self.backend = encoder.build()
        self.fingerprint = self.backend.text_fingerprint()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "embedding": self.backend.encode_text([str(t) for t in batch["text"]]),
                "tower": np.array([self.fingerprint] * len(batch["id"]), dtype=object)}


class Searcher:
    """Ray Data callable class: holds the corpus (or a FAISS index of it), answers blocks of queries."""

    def __init__(self, corpus_ref, k: int, columns: list[str], index: IndexOptions, index_ref=None,
                 threads: int = 1):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.corpus = ray.get(corpus_ref[0])  # zero-copy from the node's object store
        self.prepared = QuantizedCorpus(self.corpus) if index_ref is None else None
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
    threads: int = 1  # torch / faiss threads per actor
    text_batch_size: int = 256  # corpus texts per actor call
    query_batch_size: int = 1024  # samples per search call
    recall_sample: int = 1000  # queries used to measure an index's recall@k against exact
    index: IndexOptions = IndexOptions()


def default_actors(actor_cpus: float) -> int:
    import ray

    return max(1, int(float(ray.cluster_resources().get("CPU", 1)) // actor_cpus))


def embed_corpus(encoder: EncoderSpec, texts: list[str], options: SearchOptions) -> tuple[np.ndarray, str]:
    """(corpus embeddings [N, D] in corpus order, text-tower fingerprint), embedded by a pool of actors."""
    import ray

    actors = options.actors or default_actors(options.actor_cpus)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(TextEmbedder, batch_size=options.text_batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"encoder": encoder, "torch_threads": options.threads},
                        compute=ray.data.ActorPoolStrategy(size=min(actors, max(1, len(texts) // 64) or 1)),
                        num_cpus=options.actor_cpus)
    ids, parts, towers = [], [], set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["id"])
        parts.append(batch["embedding"])
        towers.update(str(t) for t in batch["tower"])
    if len(towers) != 1:
        raise RuntimeError(f"actors disagree on the text tower: {sorted(towers)}")
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(parts)[order].astype(np.float32), towers.pop()


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
                      text_column: str = "text") -> dict[str, Any]:
    """Top-k corpus texts for every query column of an extraction output; returns the manifest."""
    import pyarrow.parquet as pq
    import ray

    from training.knowledge import read_corpus

    extraction, out_dir = Path(extraction), Path(out_dir)
    extracted = json.loads((extraction / MANIFEST).read_text())
    missing = [c for c in columns if c not in extracted["columns"]]
    if missing:
        raise ValueError(f"{extraction}: no column(s) {missing}; columns: {sorted(extracted['columns'])}")
    started = time.perf_counter()
    texts = read_corpus(corpus_path, text_column)
    corpus, tower = embed_corpus(encoder, texts, options)
    embedded = time.perf_counter()
    LOGGER.info("corpus: %d texts embedded in %.1f s", len(texts), embedded - started)
    index = build_index(corpus, options.index) if options.index.kind != "exact" else None
    parts = [str(extraction / p) for p in extracted["parts"]]
    if (out_dir / RESULTS).exists():
        shutil.rmtree(out_dir / RESULTS)
    (out_dir / RESULTS).mkdir(parents=True)
    ds = ray.data.from_arrow(query_tables(parts, columns))
    for i, batch in enumerate(search_dataset(ds, corpus, columns, options, index).iter_batches(
            batch_size=None, batch_format="pyarrow")):
        pq.write_table(batch, out_dir / RESULTS / f"part-{i:05d}.parquet")
    seconds = time.perf_counter() - embedded
    np.save(out_dir / CORPUS_EMBEDDINGS, corpus)
    queries = sum(int(np.prod(extracted["columns"][c][:-1] or [1])) for c in columns) * extracted["samples"]
    manifest = {
        "corpus": {"path": str(Path(corpus_path).resolve()), "text_column": text_column, "texts": len(texts),
                   "sha256": hashlib.sha256(Path(corpus_path).read_bytes()).hexdigest()},
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
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


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
