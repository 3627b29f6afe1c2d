"""Feature extraction with Ray: shards -> image (and geo_time [CLS]) embeddings as Parquet.

The pipeline is Ray Data end to end:

1. one Ray task per shard reads it with our fault-tolerant reader (``shards.reader``), decodes and
   preprocesses every sample; bad records (corrupt tar, image or json) are counted and named;
2. a pool of actors (``map_batches`` with a callable class and ``ActorPoolStrategy``) embeds the
   batches; each actor builds its :class:`EncoderBackend` once: an export folder (``launch/export.py``)
   through serving's onnxruntime runtime (``onnx``: fp32 or int8 on CPU, CUDA with ``actor_gpus``; the
   actor imports no torch, and images are preprocessed by the NumPy twin of open_clip's transform), or the
   torch weights of a run's ``final/`` (``torch-run``);
3. the driver groups the embedded rows by shard and writes ``parts/<shard>.parquet`` plus a
   ``parts/<shard>.done.json`` marker as soon as a shard is complete, so a rerun skips finished shards.

Heavy imports (torch, open_clip, ray) happen inside functions: importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

LOGGER = logging.getLogger("multiclip.extract")
MANIFEST = "manifest.json"
PARTS = "parts"
ROW_COLUMNS = ("shard", "key", "valid", "last", "shard_rows", "skipped")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- encoder backends


class EncoderBackend(Protocol):
    """What an embedding actor needs from a model; swap it for another runtime (ONNX) without touching Ray code."""

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every output column, e.g. ``{"image_embedding": (512,)}``."""

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed images [B, 3, H, W] float32 -> {column: [B, *shape] float32}, normalised."""

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> normalised text embeddings [N, D] float32 (knowledge corpora)."""

    def text_fingerprint(self) -> str:
        """A hash of the text tower (what geo_time's corpus cache is keyed by)."""


@dataclass(frozen=True)
class EncoderSpec:
    """A picklable description of the encoder; each actor calls :meth:`build` once."""

    kind: str  # "onnx": an export folder (launch/export.py); "torch-run": a training run's final/ weights
    path: str  # the export folder, or the run folder (or its final/ folder)
    int8: bool = False  # onnx: the int8 towers (exported with --int8), the fast path on CPUs
    gpu: bool = False  # onnx: ask onnxruntime for CUDA (each actor then reserves a GPU: ExtractOptions.actor_gpus)

    def export_manifest(self) -> dict[str, Any]:
        manifest = Path(self.path) / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path}: no manifest.json (an export folder of launch/export.py)")
        data = json.loads(manifest.read_text())
        if self.int8 and "int8" not in data["graphs"]["image_encoder"]:
            raise ValueError(f"{self.path}: exported without --int8 (no image_encoder.int8.onnx)")
        return data

    def check(self) -> None:
        """Fail before any work when the model files are not there."""
        self.export_manifest() if self.kind == "onnx" else self.final_dir()

    def final_dir(self) -> Path:
        path = Path(self.path)
        final = path / "final" if (path / "final").is_dir() else path
        if not (final / "model.safetensors").is_file() or not (final / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: no final/model.safetensors + final/config.json (a finished run)")
        return final

    def build(self) -> EncoderBackend:
        if self.kind not in BACKENDS:
            raise ValueError(f"unknown encoder backend {self.kind!r}; known: {sorted(BACKENDS)}")
        if self.kind == "onnx":
            return OnnxExportEncoder(Path(self.path), int8=self.int8, gpu=self.gpu)
        return BACKENDS[self.kind](self.final_dir())

    def describe(self) -> dict[str, Any]:
        """Identity of the model for the manifest: a rerun with other weights must not mix outputs."""
        if self.kind == "onnx":
            manifest = self.export_manifest()
            names = ["image_encoder", *(e["graph"] for e in extraction_graphs(manifest))]
            graphs = [manifest["graphs"][g] for g in names]
            files = [g["int8"]["sha256"] if self.int8 and "int8" in g else g["sha256"] for g in graphs]
            return {"backend": f"onnx{'-int8' if self.int8 else ''}", "export": str(Path(self.path).resolve()),
                    "model": manifest["model_name"], "tasks": list(manifest["tasks"]),
                    "config_sha256": hashlib.sha256(json.dumps(manifest["preprocess"], sort_keys=True).encode()).hexdigest(),
                    "weights_sha256": hashlib.sha256("".join(files).encode()).hexdigest()}
        final = self.final_dir()
        config = json.loads((final / "config.json").read_text())
        return {"backend": self.kind, "run": str(Path(self.path).resolve()), "model": config["model"]["name"],
                "tasks": [t["name"] for t in config["tasks"]],
                "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
                "weights_sha256": file_sha256(final / "model.safetensors")}

    def preprocess_cfg(self) -> dict[str, Any]:
        if self.kind == "onnx":  # the export's own preprocessing, run by its NumPy twin
            return {**self.export_manifest()["preprocess"], "numpy_twin": True}
        return run_preprocess_cfg(json.loads((self.final_dir() / "config.json").read_text()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_only_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The run's config without what only training needs (pretrained files, corpora, label files).

    The final weights are loaded over the model afterwards, so nothing is downloaded or read twice.
    """
    raw = json.loads(json.dumps(raw))
    raw["model"] = {**raw["model"], "pretrained": None, "init_weights": None}
    model_dir = Path(raw["model"].get("model_config_dir", "configs/models"))
    if not model_dir.is_dir() and (ROOT / model_dir).is_dir():
        raw["model"]["model_config_dir"] = str(ROOT / model_dir)
    for task in raw["tasks"]:
        if task["name"] == "geo_time":
            task["options"] = {**task.get("options", {}), "knowledge_corpus": None, "labels_file": None,
                               "stage": "quantity"}
    return raw


def run_preprocess_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """open_clip's evaluation preprocessing for the run's model (and its pretrained tag's mean/std)."""
    import training  # noqa: F401  (torchvision compatibility before open_clip)
    import open_clip

    from training.model import register_model_configs

    model_cfg = encoder_only_config(raw)["model"]
    register_model_configs(model_cfg["model_config_dir"])
    bare = open_clip.create_model(model_cfg["name"], pretrained=None)
    cfg = dict(open_clip.get_model_preprocess_cfg(bare))
    tag = raw["model"].get("pretrained")
    if tag and "/" not in tag and not tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
        pretrained = open_clip.get_pretrained_cfg(model_cfg["name"], tag)
        cfg.update({k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


class TorchRunEncoder:
    """The torch weights of a run: the backbone's image embedding, plus the geo_time head's outputs."""

    def __init__(self, final_dir: Path):
        import training  # noqa: F401
        import torch

        from training.config import config_from_dict
        from training.evaluation import load_weights
        from training.model import build_model

        raw = encoder_only_config(json.loads((final_dir / "config.json").read_text()))
        self.model, self.backbone = build_model(config_from_dict(raw, source=str(final_dir / "config.json")))
        load_weights(self.model, final_dir / "model.safetensors")
        self.model.eval()
        self._torch = torch
        size = run_preprocess_cfg(raw)["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        self._shapes = {k: v.shape[1:] for k, v in self.encode(np.zeros((1, 3, *size), np.float32)).items()}

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            backbone = self.model.backbone
            out = {"image_embedding": torch.nn.functional.normalize(backbone.encode_image(x), dim=-1)}
            if "geo_time" in self.model.heads:
                image, tokens = self.model.heads["geo_time"].encode(backbone, x)
                out["geo_time_image"] = image
                out.update({f"geo_time_{q}_cls": t for q, t in tokens.items()})
        return {k: v.float().numpy() for k, v in out.items()}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        from training.knowledge import embed_texts

        return embed_texts(self.model.backbone, self.backbone.tokenizer, list(texts)).float().numpy()

    def text_fingerprint(self) -> str:
        from training.knowledge import tower_fingerprint

        return tower_fingerprint(self.model.backbone)


class OnnxExportEncoder:
    """An export folder through serving's onnxruntime runtime: the same engine as ``launch/infer.py``.

    Columns: the normalised image embedding, plus what each exported head declares under ``extraction``
    in its manifest entry (a graph from pixels and its outputs' column names; geo_time: its image
    embedding and [CLS] tokens, as :class:`TorchRunEncoder` writes them). Imports no torch.
    """

    def __init__(self, export_dir: Path, int8: bool = False, gpu: bool = False, threads: int = 1):
        from serving.infer import ExportedModel, normalize
        from serving.runtime import RuntimeOptions

        providers = ("cuda", "cpu") if gpu else ("cpu",)
        self.model = ExportedModel(export_dir, RuntimeOptions(providers=providers, int8=int8, intra_op_threads=threads))
        self._normalize = normalize
        size = int(self.model.manifest["preprocess"]["size"])
        self._shapes = {k: v.shape[1:] for k, v in self.encode(np.zeros((1, 3, size, size), np.float32)).items()}

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

    def text_fingerprint(self) -> str:
        return self.model.manifest["graphs"]["text_encoder"]["sha256"]


def extraction_graphs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``extraction`` entries the export's heads declare ({graph, columns}), in task order."""
    return [meta["extraction"] for meta in manifest["tasks"].values() if "extraction" in meta]


BACKENDS: dict[str, type] = {"torch-run": TorchRunEncoder, "onnx": OnnxExportEncoder}


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


_TRANSFORMS: dict[str, Any] = {}


def eval_transform(cfg: dict[str, Any]):
    """open_clip's evaluation transform, built once per worker process."""
    key = json.dumps(cfg, sort_keys=True)
    if key not in _TRANSFORMS:
        import training  # noqa: F401
        import open_clip

        _TRANSFORMS[key] = open_clip.image_transform(
            tuple(cfg["size"]), is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg.get("fill_color", 0))
    return _TRANSFORMS[key]


def image_to_array(cfg: dict[str, Any]) -> Callable[[Any], np.ndarray]:
    """PIL image -> float32 [3, H, W]: an export's NumPy twin (no torch), else open_clip's transform."""
    if cfg.get("numpy_twin"):
        from serving.preprocess import Preprocess

        return Preprocess.from_dict(cfg)
    transform = eval_transform(cfg)
    return lambda image: transform(image).numpy()


def shard_samples(url: str, preprocess_cfg: dict[str, Any], skips: ListSkipLog) -> Iterator[tuple[str, np.ndarray]]:
    """(key, preprocessed image) of every usable sample of one shard, in shard order."""
    from shards.reader import ShardSizes, decode_samples, read_shard
    from shards.writer import is_image_member

    transform = image_to_array(preprocess_cfg)
    for sample in decode_samples(read_shard(url, skips, ShardSizes().listed(url)), skips):
        name = next(n for n in sample if is_image_member(n))
        try:
            yield sample["__key__"], transform(sample[name])
        except Exception as exc:  # a transform failure only costs this sample
            skips.record(url, sample["__key__"], "bad_image", exc)


def preprocess_shards(batch: dict[str, np.ndarray], preprocess_cfg: dict[str, Any],
                      rows_per_batch: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard urls in, batches of preprocessed rows out.

    The last row of a shard carries ``last``, the shard's row count and its skip records, so the
    driver knows when a shard is complete; a shard with no usable sample yields one placeholder row.
    """
    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    for url in batch["shard"]:
        skips = ListSkipLog()
        keys, images = [], []
        for key, image in shard_samples(str(url), preprocess_cfg, skips):
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


def preprocess_udf(batch: dict[str, np.ndarray], preprocess_cfg: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    return count_rows_then_tag(preprocess_shards(batch, preprocess_cfg))


# --------------------------------------------------------------------------- stage 2: embed (actor pool)


class Embedder:
    """Ray Data callable class: one encoder per actor, built once, used for every batch."""

    def __init__(self, encoder: EncoderSpec, threads: int = 1):
        # one thread per actor: one actor per core scales, oversubscribed threads do not
        if encoder.kind == "onnx":
            self.backend = OnnxExportEncoder(Path(encoder.path), int8=encoder.int8, gpu=encoder.gpu, threads=threads)
        else:
            import training  # noqa: F401
            import torch

            torch.set_num_threads(threads)
            self.backend = encoder.build()
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


def is_done(out_dir: Path, url: str) -> bool:
    name = part_name(url)
    return (out_dir / PARTS / f"{name}.done.json").is_file() and (out_dir / PARTS / f"{name}.parquet").is_file()


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

    def __init__(self, out_dir: Path, total_shards: int, already_done: int):
        self.out_dir = out_dir
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
            entry = self.pending.setdefault(str(url), {"parts": [], "rows": 0, "expected": None, "skipped": []})
            valid = rows & batch["valid"].astype(bool)
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
        marker = {"shard": url, "rows": entry["rows"], "skipped": entry["skipped"]}
        (self.out_dir / PARTS / f"{name}.done.json").write_text(json.dumps(marker, indent=1))
        self.done += 1
        self.embedded += entry["rows"]
        self.skipped += entry["skipped"]
        rate = self.embedded / max(time.perf_counter() - self.start, 1e-9)
        LOGGER.info("[%d/%d shards] %s: %d embedded, %d skipped (%.1f images/s)", self.done, self.total_shards,
                    Path(url).name, entry["rows"], len(entry["skipped"]), rate)

    def unfinished(self) -> list[str]:
        return sorted(self.pending)


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ExtractOptions:
    actors: int | None = None  # embedding actors (default: what the cluster's CPUs allow)
    actor_cpus: float = 1.0  # CPUs reserved per actor
    threads: int = 1  # threads per actor (torch's, or onnxruntime's intra-op threads)
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
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)


def default_actors(options: ExtractOptions) -> int:
    """As many actors as the cluster's CPUs hold after one preprocessing task's share."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int((cpus - options.preprocess_cpus) // options.actor_cpus))


def check_manifest(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Resuming is only safe with the same model: refuse to mix embeddings of two models."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("encoder", {})
    same = all(old.get(k) == identity[k] for k in ("config_sha256", "weights_sha256", "backend"))
    if same:
        return
    if not overwrite:
        raise ValueError(f"{out_dir} holds embeddings of another model ({old.get('run')}, weights "
                         f"{str(old.get('weights_sha256'))[:12]}); use another --out or --overwrite")
    for p in (out_dir / PARTS).glob("*"):
        p.unlink()


def extract(shards: str | list[str], out_dir: str | Path, encoder: EncoderSpec,
            options: ExtractOptions = ExtractOptions()) -> dict[str, Any]:
    """Embed every sample of ``shards`` into ``out_dir`` (resuming), return the manifest.

    Needs Ray initialised (:func:`init_ray`).
    """
    import ray

    from shards.reader import expand_urls

    out_dir = Path(out_dir)
    urls = [str(Path(u).resolve()) for u in expand_urls(shards)]
    identity = encoder.describe()
    check_manifest(out_dir, identity, options.overwrite)
    todo = [u for u in urls if not is_done(out_dir, u)]
    actors = options.actors or default_actors(options)
    LOGGER.info("%d shards, %d already done, %d to embed with %d actor(s)", len(urls), len(urls) - len(todo),
                len(todo), actors)
    collector = ShardCollector(out_dir, len(urls), len(urls) - len(todo))
    started = time.perf_counter()
    if todo:
        ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(preprocess_udf, batch_size=1, fn_kwargs={"preprocess_cfg": encoder.preprocess_cfg()},
                            num_cpus=options.preprocess_cpus)
        ds = ds.map_batches(Embedder, batch_size=options.batch_size,
                            fn_constructor_kwargs={"encoder": encoder, "threads": options.threads},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=options.actor_cpus,
                            **({"num_gpus": options.actor_gpus} if options.actor_gpus else {}))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            collector.add(batch)
        if collector.unfinished():
            raise RuntimeError(f"shards not completed: {collector.unfinished()}")
    elapsed = time.perf_counter() - started
    manifest = write_manifest(out_dir, urls, identity, encoder, options, actors, collector, elapsed)
    return manifest


def write_manifest(out_dir: Path, urls: list[str], identity: dict[str, Any], encoder: EncoderSpec,
                   options: ExtractOptions, actors: int, collector: ShardCollector, elapsed: float) -> dict[str, Any]:
    """Totals over every completed shard (this run and earlier ones)."""
    markers = [json.loads((out_dir / PARTS / f"{part_name(u)}.done.json").read_text()) for u in urls
               if is_done(out_dir, u)]
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
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
