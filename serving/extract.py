"""Feature extraction with Ray: shards -> embeddings as Parquet, one column per output of the model.

The pipeline is Ray Data end to end:

1. one Ray task per shard reads it with the fault-tolerant, torch-free reader (``shards.samples``),
   decodes and preprocesses every sample; bad records (corrupt tar, image or json) are counted and named;
2. a pool of actors (``map_batches`` with a callable class and ``ActorPoolStrategy``) embeds the
   batches; each actor builds its :class:`EncoderBackend` once. Here: an export folder
   (``launch/export.py``) through serving's onnxruntime runtime (``onnx``: fp32 or int8 on CPU, CUDA with
   ``actor_gpus``; images are preprocessed by the NumPy twin of open_clip's transform); its columns are
   the image embedding and what the export's heads declare under ``extraction``. Other backends register
   themselves in ``BACKENDS`` (``training.extract_torch``: a training run's torch weights);
3. the driver groups the embedded rows by shard and writes ``parts/<shard>.parquet`` plus a
   ``parts/<shard>.done.json`` marker as soon as a shard is complete, so a rerun skips finished shards.

Nothing mixed: ``job.json`` (written before any work) names the model whose embeddings the folder
holds, and every marker records that model's key and the input shard's size and mtime; a rerun with
another model is refused (``--overwrite`` clears this tool's parts), a shard regenerated in place is
embedded again, and a non-empty folder this tool did not write is never used. Markers and the
manifest are written atomically (``shards.atomic``).

This module imports no torch; ray, pyarrow and onnxruntime are imported inside functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from shards.atomic import read_json, write_json
from shards.progress import progress_bar

LOGGER = logging.getLogger("multiclip.extract")
MANIFEST = "manifest.json"
JOB = "job.json"  # written first: whose embeddings this folder holds
PARTS = "parts"
ROW_COLUMNS = ("shard", "key", "valid", "last", "shard_rows", "skipped")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- encoder backends


class EncoderBackend(Protocol):
    """What an embedding actor needs from a model; a class in ``BACKENDS`` builds one per actor.

    Besides the instance methods below, a backend class answers for a spec before any actor exists
    (static methods taking the :class:`EncoderSpec`): ``check``, ``describe``, ``preprocess_cfg``, and
    ``image_transform(cfg)`` (PIL image -> float32 [3, H, W]) for the read tasks; and
    ``from_spec(spec, threads)`` builds the backend in the actor.
    """

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every output column, e.g. ``{"image_embedding": (512,)}``."""

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed images [B, 3, H, W] float32 -> {column: [B, *shape] float32}, normalised."""


@dataclass(frozen=True)
class EncoderSpec:
    """A picklable description of the encoder; each actor builds it once (:meth:`build`).

    ``kind`` names a backend of ``BACKENDS``: ``onnx`` (an export folder of launch/export.py, here) or a
    backend another module registers (``torch-run``: a training run's final/ weights, registered by
    ``training.extract_torch``). A pickled spec names the module that registered its backend, so Ray
    workers import it before they build the backend.
    """

    kind: str  # a key of BACKENDS: "onnx" (an export folder) or one registered by another module
    path: str  # the export folder (or what the registered backend reads, e.g. a run folder)
    int8: bool = False  # onnx: the int8 towers (exported with --int8), the fast path on CPUs
    gpu: bool = False  # onnx: ask onnxruntime for CUDA (each actor then reserves a GPU: ExtractOptions.actor_gpus)

    def backend(self) -> type:
        if self.kind not in BACKENDS:
            raise ValueError(f"unknown encoder backend {self.kind!r}; known: {sorted(BACKENDS)} (a backend defined "
                             "outside serving/ is known once its module is imported)")
        return BACKENDS[self.kind]

    def check(self) -> None:
        """Fail before any work when the model files are not there."""
        self.backend().check(self)

    def build(self, threads: int = 1) -> EncoderBackend:
        return self.backend().from_spec(self, threads)

    def describe(self) -> dict[str, Any]:
        """Identity of the model for the manifest: a rerun with other weights must not mix outputs."""
        return self.backend().describe(self)

    def preprocess_cfg(self) -> dict[str, Any]:
        return self.backend().preprocess_cfg(self)

    def export_manifest(self) -> dict[str, Any]:
        manifest = Path(self.path) / "manifest.json"
        if self.kind != "onnx":
            raise ValueError(f"{self.path}: a {self.kind!r} encoder, not an export folder (launch/export.py)")
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path}: no manifest.json (an export folder of launch/export.py)")
        data = json.loads(manifest.read_text())
        if self.int8 and "int8" not in data["graphs"]["image_encoder"]:
            raise ValueError(f"{self.path}: exported without --int8 (no image_encoder.int8.onnx)")
        return data

    def runtime_options(self, threads: int = 1):
        """onnxruntime options of this export's sessions in one actor."""
        from serving.runtime import RuntimeOptions

        return RuntimeOptions(providers=("cuda", "cpu") if self.gpu else ("cpu",), int8=self.int8,
                              intra_op_threads=threads)

    def text_fingerprint(self) -> str:
        """A hash of the exported text tower: the text graph file it runs (int8 where asked and exported) and
        the tokenizer's vocabulary, from the sha256 the export manifest records; what corpus embeddings are
        keyed by."""
        manifest = self.export_manifest()
        graph = manifest["graphs"]["text_encoder"]
        graph = graph["int8"] if self.int8 and "int8" in graph else graph
        files = {"text_graph": [graph["file"], graph["sha256"]], "tokenizer": manifest["tokenizer"].get("bpe_sha256")}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]

    def __reduce__(self):
        module = BACKENDS[self.kind].__module__ if self.kind in BACKENDS else None
        return _unpickle_spec, (module, self.kind, self.path, self.int8, self.gpu)


def _unpickle_spec(module: str | None, *fields: Any) -> EncoderSpec:
    if module:
        importlib.import_module(module)  # registers the backend in this process (a Ray worker)
    return EncoderSpec(*fields)


class OnnxExportEncoder:
    """An export folder through serving's onnxruntime runtime: the same engine as ``launch/infer.py``.

    Columns: the normalised image embedding, plus what each exported head declares under ``extraction``
    in its manifest entry (a graph from pixels and its outputs' column names). Imports no torch.
    """

    def __init__(self, export_dir: Path, int8: bool = False, gpu: bool = False, threads: int = 1):
        from serving.infer import ExportedModel, normalize

        spec = EncoderSpec("onnx", str(export_dir), int8=int8, gpu=gpu)
        self.model = ExportedModel(export_dir, spec.runtime_options(threads))
        self._normalize = normalize
        size = int(self.model.manifest["preprocess"]["size"])
        self._shapes = {k: v.shape[1:] for k, v in self.encode(np.zeros((1, 3, size, size), np.float32)).items()}

    @classmethod
    def from_spec(cls, spec: EncoderSpec, threads: int = 1) -> "OnnxExportEncoder":
        return cls(Path(spec.path), int8=spec.int8, gpu=spec.gpu, threads=threads)

    @staticmethod
    def check(spec: EncoderSpec) -> None:
        spec.export_manifest()

    @staticmethod
    def describe(spec: EncoderSpec) -> dict[str, Any]:
        manifest = spec.export_manifest()
        names = ["image_encoder", *(e["graph"] for e in extraction_graphs(manifest))]
        graphs = [manifest["graphs"][g] for g in names]
        files = [g["int8"]["sha256"] if spec.int8 and "int8" in g else g["sha256"] for g in graphs]
        return {"backend": f"onnx{'-int8' if spec.int8 else ''}", "export": str(Path(spec.path).resolve()),
                "model": manifest["model_name"], "tasks": list(manifest["tasks"]),
                "config_sha256": hashlib.sha256(json.dumps(manifest["preprocess"], sort_keys=True).encode()).hexdigest(),
                "weights_sha256": hashlib.sha256("".join(files).encode()).hexdigest()}

    @staticmethod
    def preprocess_cfg(spec: EncoderSpec) -> dict[str, Any]:
        return {**spec.export_manifest()["preprocess"], "numpy_twin": True}  # run by its NumPy twin

    @staticmethod
    def image_transform(cfg: dict[str, Any]) -> Callable[[Any], np.ndarray]:
        from serving.preprocess import Preprocess

        return Preprocess.from_dict(cfg)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.ascontiguousarray(images, dtype=np.float32)
        out = {"image_embedding": self._normalize(self.model.image_features(pixels))}
        for extraction in extraction_graphs(self.model.manifest):
            outputs = self.model.session(extraction["graph"]).run(pixels=pixels)
            out.update({column: outputs[name] for name, column in extraction["columns"].items()})
        return {k: v.astype(np.float32) for k, v in out.items()}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.model.text_embeddings(list(texts))


def extraction_graphs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``extraction`` entries the export's heads declare ({graph, columns}), in task order."""
    return [meta["extraction"] for meta in manifest["tasks"].values() if "extraction" in meta]


BACKENDS: dict[str, type] = {"onnx": OnnxExportEncoder}  # training.extract_torch adds "torch-run"


def register_backend(kind: str, backend: type) -> None:
    """Add an encoder backend (a class with the methods :class:`EncoderBackend` describes)."""
    if BACKENDS.get(kind, backend) is not backend:
        raise ValueError(f"encoder backend {kind!r} is already registered ({BACKENDS[kind].__module__})")
    BACKENDS[kind] = backend


# --------------------------------------------------------------------------- stage 1: read + preprocess (Ray tasks)


class ListSkipLog:
    """A SkipLog that keeps the records, so a Ray task can hand them back with the shard's rows."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.count = 0

    def record(self, shard: str, key: str | None, reason: str, error: BaseException | str) -> None:
        self.count += 1
        self.records.append({"shard": shard, "key": key, "reason": reason, "error": str(error)[:300]})
        LOGGER.warning("skipped sample: shard=%s key=%s reason=%s error=%s", shard, key, reason, str(error)[:300])


def shard_samples(url: str, transform: Callable[[Any], np.ndarray], skips: ListSkipLog) -> Iterator[tuple[str, np.ndarray]]:
    """(key, preprocessed image) of every usable sample of one shard, in shard order."""
    from shards.members import is_written_image_member
    from shards.samples import ShardSizes, decode_samples, read_shard

    for sample in decode_samples(read_shard(url, skips, ShardSizes().listed(url)), skips):
        name = next(n for n in sample if is_written_image_member(n))
        try:
            yield sample["__key__"], transform(sample[name])
        except Exception as exc:  # a transform failure only costs this sample
            skips.record(url, sample["__key__"], "bad_image", exc)


def preprocess_shards(batch: dict[str, np.ndarray], preprocess_cfg: dict[str, Any], encoder: EncoderSpec,
                      rows_per_batch: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard urls in, batches of preprocessed rows out.

    The last row of a shard carries ``last``, the shard's row count and its skip records, so the
    driver knows when a shard is complete; a shard with no usable sample yields one placeholder row.
    """
    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    transform = encoder.backend().image_transform(preprocess_cfg)
    for url in batch["shard"]:
        skips = ListSkipLog()
        keys, images = [], []
        for key, image in shard_samples(str(url), transform, skips):
            keys.append(key)
            images.append(image)
            if len(keys) == rows_per_batch + 1:  # hold one row back: it may be the shard's last
                yield _rows(str(url), keys[:-1], images[:-1], None)
                keys, images = keys[-1:], images[-1:]
        yield _rows(str(url), keys, images, skips.records, size)


def _rows(url: str, keys: list[str], images: list[np.ndarray], skipped: list[dict] | None,
          size: tuple[int, int] = (0, 0)) -> dict[str, np.ndarray]:
    n = len(keys)
    if n == 0:  # placeholder: the shard had no usable sample
        keys, images = [""], [np.zeros((3, *size), np.float32)]
    rows = len(keys)
    last = np.zeros(rows, bool)
    shard_rows = np.zeros(rows, np.int64)
    skipped_col = np.array([""] * rows, dtype=object)
    if skipped is not None:
        last[-1], skipped_col[-1] = True, json.dumps(skipped)
        shard_rows[-1] = -1  # filled by the caller that knows the total
    return {"shard": np.array([url] * rows, dtype=object), "key": np.array(keys, dtype=object),
            "valid": np.full(rows, n > 0), "last": last, "shard_rows": shard_rows, "skipped": skipped_col,
            "image": np.stack(images).astype(np.float32)}


def count_rows_then_tag(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Fill the shard's total into its last row (the generator above does not count)."""
    total = 0
    for batch in batches:
        total += int(batch["valid"].sum())
        if batch["last"].any():
            batch["shard_rows"][-1] = total
            total = 0
        yield batch


def preprocess_udf(batch: dict[str, np.ndarray], preprocess_cfg: dict[str, Any],
                   encoder: EncoderSpec) -> Iterator[dict[str, np.ndarray]]:
    return count_rows_then_tag(preprocess_shards(batch, preprocess_cfg, encoder))


# --------------------------------------------------------------------------- stage 2: embed (actor pool)


class Embedder:
    """Ray Data callable class: one encoder per actor, built once, used for every batch."""

    def __init__(self, encoder: EncoderSpec, threads: int = 1):
        # one thread per actor: one actor per core scales, oversubscribed threads do not
        self.backend = encoder.build(threads)
        self.shapes = self.backend.output_shapes()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = batch["valid"].astype(bool)
        out = {k: batch[k] for k in ROW_COLUMNS}
        encoded = self.backend.encode(batch["image"][valid]) if valid.any() else {}
        for name, shape in self.shapes.items():
            column = np.zeros((len(valid), *shape), np.float32)
            if valid.any():
                column[valid] = encoded[name]
            out[name] = column
        return out


# --------------------------------------------------------------------------- stage 3: per-shard output (driver)


def part_name(url: str) -> str:
    """A file name per shard, unique across directories (train/shard-0 vs val/shard-0)."""
    path = Path(url).resolve()
    return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def encoder_key(identity: dict[str, Any]) -> str:
    """What makes two extractions' embeddings comparable: backend, config and weights (a short hash)."""
    fields = {k: identity.get(k) for k in ("backend", "config_sha256", "weights_sha256")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def shard_identity(url: str) -> dict[str, int]:
    """The input shard as it was read: a shard regenerated in place (new size or mtime) is embedded again."""
    stat = os.stat(url)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_marker(out_dir: Path, url: str) -> dict[str, Any] | None:
    """A shard's ``.done.json`` when it and its part exist and the marker is whole; else None (redo it)."""
    name = part_name(url)
    marker, part = out_dir / PARTS / f"{name}.done.json", out_dir / PARTS / f"{name}.parquet"
    if not (marker.is_file() and part.is_file()):
        return None
    try:
        return read_json(marker, "a shard marker")
    except ValueError as err:
        LOGGER.warning("%s; the shard is embedded again", err)
        return None


def is_done(out_dir: Path, url: str, key: str | None = None) -> bool:
    """Finished by the encoder ``key`` (any, when None) from the shard as it is now."""
    marker = read_marker(out_dir, url)
    if marker is None:
        return False
    if key is not None and marker.get("encoder") != key:
        raise ValueError(f"{out_dir / PARTS / part_name(url)}.done.json was written by another model "
                         f"(encoder {marker.get('encoder')}, this one {key}); use another --out or --overwrite")
    return marker.get("input") == shard_identity(url)


def tensor_array(values: np.ndarray):
    """[N, *shape] float32 -> nested fixed-size lists (Parquet keeps the shape, any reader can flatten)."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def tensor_column(column) -> np.ndarray:
    """Inverse of :func:`tensor_array` for a (chunked) Arrow column."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = []
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(-1, *shape)


class ShardCollector:
    """Gathers embedded rows per shard and writes each shard's Parquet + marker once all rows arrived."""

    def __init__(self, out_dir: Path, total_shards: int, already_done: int, encoder: str = "",
                 inputs: dict[str, dict[str, int]] | None = None, progress=None):
        """``encoder``: the encoder key each marker records; ``inputs``: each shard's identity taken before
        it was read (a shard changed meanwhile then no longer matches, and is embedded again next time);
        ``progress``: a bar (``shards.progress``) counting samples, embedded or skipped."""
        self.out_dir, self.encoder, self.inputs, self.progress = out_dir, encoder, inputs or {}, progress
        (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, dict[str, Any]] = {}
        self.total_shards, self.done = total_shards, already_done
        self.embedded, self.skipped = 0, []
        self.start = time.perf_counter()
        self.first_batch: float | None = None  # seconds to the first embedded batch (actor start-up)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        if self.first_batch is None:
            self.first_batch = time.perf_counter() - self.start
        shards = batch["shard"]
        for url in np.unique(shards):
            rows = shards == url
            entry = self.pending.setdefault(str(url), {"parts": [], "rows": 0, "expected": None, "skipped": [],
                                                       "input": self.inputs.get(str(url))})
            valid = rows & batch["valid"].astype(bool)
            self._advance(int(valid.sum()))
            if valid.any():
                entry["parts"].append({k: v[valid] for k, v in batch.items() if k not in ROW_COLUMNS or k == "key"})
                entry["rows"] += int(valid.sum())
            for i in np.flatnonzero(rows & batch["last"].astype(bool)):
                entry["expected"], entry["skipped"] = int(batch["shard_rows"][i]), json.loads(batch["skipped"][i])
            if entry["expected"] is not None and entry["rows"] == entry["expected"]:
                self._write(str(url), self.pending.pop(str(url)))

    def _write(self, url: str, entry: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = entry["parts"]
        columns = {"key": pa.array([str(k) for p in parts for k in p["key"]], pa.string())}
        for name in (parts[0] if parts else {}):
            if name != "key":
                columns[name] = tensor_array(np.concatenate([p[name] for p in parts]))
        name = part_name(url)
        target = self.out_dir / PARTS / f"{name}.parquet"
        tmp = target.with_suffix(".parquet.tmp")
        pq.write_table(pa.table(columns), tmp)
        tmp.replace(target)
        marker = {"shard": url, "rows": entry["rows"], "skipped": entry["skipped"], "encoder": self.encoder,
                  "input": entry["input"]}
        write_json(self.out_dir / PARTS / f"{name}.done.json", marker)
        self.done += 1
        self.embedded += entry["rows"]
        self.skipped += entry["skipped"]
        self._advance(len(entry["skipped"]), shards=f"{self.done}/{self.total_shards}")
        rate = self.embedded / max(time.perf_counter() - self.start, 1e-9)
        LOGGER.info("[%d/%d shards] %s: %d embedded, %d skipped (%.1f images/s)", self.done, self.total_shards,
                    Path(url).name, entry["rows"], len(entry["skipped"]), rate)

    def _advance(self, samples: int, **postfix: str) -> None:
        if self.progress is not None:
            self.progress.update(samples)
            if postfix:
                self.progress.set_postfix(postfix, refresh=False)

    def unfinished(self) -> list[str]:
        return sorted(self.pending)


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ExtractOptions:
    actors: int | None = None  # embedding actors (default: what the cluster's CPUs allow)
    actor_cpus: float = 1.0  # CPUs reserved per actor
    threads: int = 1  # threads per actor (onnxruntime's intra-op threads, or the registered backend's)
    actor_gpus: float = 0.0  # GPUs reserved per actor (onnx with gpu=True: one per actor)
    batch_size: int = 128  # images per actor call
    preprocess_cpus: float = 0.5  # CPUs per read/preprocess task
    overwrite: bool = False  # start over instead of resuming when the model differs


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS, as inside ``ray job submit``), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # a job's working_dir already carries the code
    runtime_env = None if in_job else {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and _loopback_only_cluster(address):  # such a cluster is only reached as a loopback node
        with _loopback_node():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, _node_ip_address="127.0.0.1")
    elif address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        with _loopback_node():  # "local": a new Ray, never one a `ray start` left (live or dead) in /tmp/ray
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     runtime_env=runtime_env, _node_ip_address="127.0.0.1")


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this machine's loopback: such a
    cluster (``ray start --node-ip-address=127.0.0.1`` with cluster mode off) is only reachable by a
    driver whose own node IP is 127.0.0.1 (otherwise Ray looks for the GCS at the main interface)."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _loopback_only_cluster(address: str) -> bool:
    """Whether the cluster at a loopback ``address`` listens on loopback only (started in loopback mode, as
    ``init_ray`` starts its own): then this driver must join as a loopback node. A cluster that also listens
    on the main interface (a plain ``ray start``, whose raylet registers the main address) is joined as
    usual; a probe of the GCS port on the main address tells the two apart."""
    if not _is_loopback(address):
        return False
    from ray._private.services import get_node_ip_address

    main, port = get_node_ip_address(), int(address.rsplit(":", 1)[1])
    if main.startswith("127.") or main == "::1":
        return True
    with socket.socket(socket.AF_INET6 if ":" in main else socket.AF_INET) as probe:
        probe.settimeout(2)
        return probe.connect_ex((main, port)) != 0


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """A local Ray whose node IP is 127.0.0.1, so that every one of its servers listens on loopback only.

    Ray binds its gRPC servers (GCS, raylet, object manager, workers), agents and metrics endpoints to the
    node IP. On Linux ``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the primary interface's
    address (they all listened on 0.0.0.0, :: or that address, metrics included) unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, which is Ray's own default on macOS and Windows. That
    switch is read when ray is imported, so its constant is turned off for the ``ray.init`` call itself."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def default_actors(options: ExtractOptions) -> int:
    """As many actors as the cluster's CPUs hold after one preprocessing task's share."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int((cpus - options.preprocess_cpus) // options.actor_cpus))


def claim_output(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Make ``out_dir`` this extraction's, before any work: ``job.json`` names the model whose embeddings
    the folder holds. Resuming is only safe with the same model, so another model's folder is refused
    (``--overwrite`` clears the parts this tool wrote), and a non-empty folder this tool did not write is
    never used or deleted."""
    job = out_dir / JOB
    if out_dir.is_dir() and any(out_dir.iterdir()) and not job.is_file():
        raise FileExistsError(f"{out_dir}: not empty and has no {JOB} (not an extraction output); choose another --out")
    if job.is_file():
        old = read_json(job, "the extraction's job file").get("encoder", {})
        if encoder_key(old) != encoder_key(identity):
            if not overwrite:
                raise ValueError(f"{out_dir} holds embeddings of another model ({old.get('run') or old.get('export')}, "
                                 f"weights {str(old.get('weights_sha256'))[:12]}); use another --out or --overwrite")
            for p in (out_dir / PARTS).glob("*"):
                p.unlink()
            (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    write_json(job, {"encoder": identity, "key": encoder_key(identity)})


def extract(shards: str | list[str], out_dir: str | Path, encoder: EncoderSpec,
            options: ExtractOptions = ExtractOptions()) -> dict[str, Any]:
    """Embed every sample of ``shards`` into ``out_dir`` (resuming), return the manifest.

    Needs Ray initialised (:func:`init_ray`).
    """
    import ray

    from shards.samples import expand_urls, is_pipe, is_url

    out_dir = Path(out_dir)
    remote = [u for u in expand_urls(shards) if is_url(u) or is_pipe(u)]
    if remote:  # resume decisions rest on each shard's size and mtime, which only a local file has here
        raise ValueError(f"{remote[0]}: the Ray extraction reads local shard files only (it resumes by each "
                         "shard's size and mtime); copy the shards first, e.g. with fsspec or `aws s3 sync`")
    urls = [str(Path(u).resolve()) for u in expand_urls(shards)]
    identity = encoder.describe()
    claim_output(out_dir, identity, options.overwrite)
    key = encoder_key(identity)
    todo = [u for u in urls if not is_done(out_dir, u, key)]
    actors = options.actors or default_actors(options)
    LOGGER.info("%d shards, %d already done, %d to embed with %d actor(s)", len(urls), len(urls) - len(todo),
                len(todo), actors)
    collector = ShardCollector(out_dir, len(urls), len(urls) - len(todo), key, {u: shard_identity(u) for u in todo})
    started = time.perf_counter()
    if todo:
        driver_progress_only()
        ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(preprocess_udf, batch_size=1,
                            fn_kwargs={"preprocess_cfg": encoder.preprocess_cfg(), "encoder": encoder},
                            num_cpus=options.preprocess_cpus)
        ds = ds.map_batches(Embedder, batch_size=options.batch_size,
                            fn_constructor_kwargs={"encoder": encoder, "threads": options.threads},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=options.actor_cpus,
                            **({"num_gpus": options.actor_gpus} if options.actor_gpus else {}))
        with progress_bar(total=listed_samples(todo), desc="extract", unit="img") as bar:
            collector.progress = bar
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
        if collector.unfinished():
            raise RuntimeError(f"shards not completed: {collector.unfinished()}")
    elapsed = time.perf_counter() - started
    manifest = write_manifest(out_dir, urls, identity, encoder, options, actors, collector, elapsed)
    return manifest


def listed_samples(urls: list[str]) -> int | None:
    """Samples in the shards by their sizes.json (the progress bar's total); None when a shard is not listed."""
    from shards.samples import ShardSizes

    sizes = ShardSizes()
    counts = [sizes.listed(u) for u in urls]
    return None if None in counts else sum(counts)


def driver_progress_only() -> None:
    """Ray Data's own per-operator bars off: the driver draws one bar (``shards.progress``) from completed
    batches, on a terminal only."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


def write_manifest(out_dir: Path, urls: list[str], identity: dict[str, Any], encoder: EncoderSpec,
                   options: ExtractOptions, actors: int, collector: ShardCollector, elapsed: float) -> dict[str, Any]:
    """Totals over every completed shard (this run and earlier ones)."""
    markers = [read_marker(out_dir, u) for u in urls if is_done(out_dir, u)]
    skipped = [r for m in markers for r in m["skipped"]]
    by_reason: dict[str, int] = {}
    for record in skipped:
        by_reason[record["reason"]] = by_reason.get(record["reason"], 0) + 1
    manifest = {
        "encoder": identity, "preprocess": encoder.preprocess_cfg(), "columns": _columns(out_dir, urls),
        "shards": {"total": len(urls), "done": len(markers)},
        "samples": sum(m["rows"] for m in markers),
        "skipped": {"count": len(skipped), "by_reason": by_reason, "records": skipped[:1000]},
        "this_run": {"embedded": collector.embedded, "seconds": round(elapsed, 2), "actors": actors,
                     "images_per_s": round(collector.embedded / elapsed, 2) if elapsed > 0 else None,
                     "first_batch_seconds": None if collector.first_batch is None else round(collector.first_batch, 2),
                     "options": asdict(options)},
        "parts": [f"{PARTS}/{part_name(u)}.parquet" for u in urls],
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _columns(out_dir: Path, urls: list[str]) -> dict[str, list[int]]:
    import pyarrow.parquet as pq

    for u in urls:
        path = out_dir / PARTS / f"{part_name(u)}.parquet"
        if path.is_file():
            table = pq.read_table(path)
            if table.num_rows:
                return {n: list(tensor_column(table[n]).shape[1:]) for n in table.column_names if n != "key"}
    return {}


def read_embeddings(out_dir: str | Path, column: str = "image_embedding") -> tuple[list[str], np.ndarray]:
    """(sample keys, embeddings [N, *shape]) of one column over every part, in manifest order."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    keys, arrays = [], []
    for part in manifest["parts"]:
        table = pq.read_table(out_dir / part)
        if table.num_rows == 0:
            continue
        if column not in table.column_names:
            raise KeyError(f"{out_dir / part}: no column {column!r}; columns: {table.column_names}")
        keys += table["key"].to_pylist()
        arrays.append(tensor_column(table[column]))
    return keys, np.concatenate(arrays) if arrays else np.zeros((0,), np.float32)
