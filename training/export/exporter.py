"""Export a training run to ONNX (training side: torch; the serving runtime in ``serving/`` reads the result).

What a run becomes (``launch/export.py --checkpoint runs/<run> --out DIR``):

    DIR/image_encoder.onnx   pixels [B, 3, S, S] float32 -> image_features [B, D] (projected, not normalised)
    DIR/text_encoder.onnx    input_ids [B, L] int64 -> text_features [B, D]
    DIR/<task>_*.onnx        each head's inference part (see the exporters below)
    DIR/*.npy, *.json        what inference needs without torch: bins, label sets, prompts, corpora
    DIR/bpe_simple_vocab_16e6.txt.gz   the tokenizer's merges (open_clip's file)
    DIR/manifest.json        preprocessing, tokenizer, graphs (I/O, parity), task metadata, versions, hashes

Every graph has a dynamic batch axis and is checked against torch with onnxruntime right after
export on fixed inputs (max |diff| <= 1e-4 in fp32; cosine >= 0.999 for the optional fp16 and int8 copies);
a failed check raises :class:`ParityError` and the export stops.

Each head describes its own export in its task file (``Task.export_onnx``: graphs plus files and
metadata, see :mod:`training.export.graph`), and ``serving/predictors/<task>.py`` has the matching torch-free
predictor. This is the training side: it imports torch; ``serving/`` reads what it writes.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch
from torch import nn

from shards.atomic import file_sha256 as sha256, replacing_dir
from shards.progress import progress_bar
from training.config import ConfigError
from training.export.graph import FIXED_TEXTS, Graph, HeadExport, ImageEncoder, TextEncoder, fixed_images, image_size
from training.backbone import Backbone
from training.model import MultiTaskModel
from training.runs import load_run

LOG = logging.getLogger("multiclip.export")
FORMAT = "multiclip-onnx/1"
MANIFEST = "manifest.json"
FP32_TOLERANCE = 1e-4
REDUCED_MIN_COSINE = 0.999  # fp16 and int8 copies, per item, to fp32
MAX_BATCH = 4096


class ParityError(RuntimeError):
    """onnxruntime's outputs differ from torch's beyond the tolerance."""


# --------------------------------------------------------------------------- backbone towers


def backbone_graphs(backbone: Backbone) -> list[Graph]:
    images = fixed_images(backbone)
    tokens = backbone.tokenizer(FIXED_TEXTS)
    return [Graph("image_encoder", ImageEncoder(backbone.model), {"pixels": images}, ["image_features"]),
            Graph("text_encoder", TextEncoder(backbone.model), {"input_ids": tokens}, ["text_features"])]


# --------------------------------------------------------------------------- export and parity


def _dynamic_shapes(graph: Graph) -> tuple[dict[int, torch.export.Dim], ...]:
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for name in graph.inputs:
        axes = graph.dynamic.get(name, {0: "batch"})
        spec = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=1, max=MAX_BATCH)
            spec[axis] = dims[dim_name]
        out.append(spec)
    return tuple(out)


def to_onnx(graph: Graph, path: Path) -> None:
    """torch.export + onnxscript (opset 20); the legacy TorchScript exporter if dynamo fails."""
    graph.module.eval()
    args = tuple(graph.inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph.module, args, dynamo=True, input_names=list(graph.inputs),
                                        output_names=graph.outputs, dynamic_shapes=_dynamic_shapes(graph),
                                        external_data=False, verbose=False)
            program.save(str(path))
        except Exception as err:  # noqa: BLE001  (any dynamo failure: try the other exporter, say so)
            LOG.warning("%s: dynamo export failed (%s); using the TorchScript exporter", graph.name, err)
            axes = {n: {a: d for a, d in graph.dynamic.get(n, {0: "batch"}).items()} for n in graph.inputs}
            axes.update({n: {0: "batch"} for n in graph.outputs})
            torch.onnx.export(graph.module, args, str(path), dynamo=False, opset_version=17,
                              input_names=list(graph.inputs), output_names=graph.outputs, dynamic_axes=axes)
    onnx.checker.check_model(str(path))


def _run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if path.name.endswith(".fp16.onnx"):  # onnxruntime 1.32's CPU layout passes crash on fp16 graphs
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _torch_outputs(graph: Graph, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = graph.module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def _parity_inputs(graph: Graph) -> list[dict[str, torch.Tensor]]:
    """The fixed inputs, and the same with batch 1 (checks that the batch axis really is dynamic)."""
    batch_inputs = [n for n in graph.inputs if graph.dynamic.get(n, {0: "batch"}).get(0) == "batch"]
    one = {n: (v[:1] if n in batch_inputs else v) for n, v in graph.inputs.items()}
    return [graph.inputs, one]


def check_fp32(graph: Graph, path: Path, tolerance: float = FP32_TOLERANCE) -> float:
    """Max |torch - onnxruntime| over every output, at the example batch and at batch 1."""
    worst = 0.0
    for inputs in _parity_inputs(graph):
        expected = _torch_outputs(graph, inputs)
        got = _run_onnx(path, {k: v.numpy() for k, v in inputs.items()})
        for name, e, g in zip(graph.outputs, expected, got):
            if e.shape != g.shape:
                raise ParityError(f"{path.name}: output {name} has shape {g.shape} in onnxruntime, {e.shape} in torch")
            worst = max(worst, float(np.abs(e - g).max()) if e.size else 0.0)
    if not worst <= tolerance:  # also catches NaN
        raise ParityError(f"{path.name}: max |torch - onnxruntime| = {worst:.3g} > {tolerance:g}")
    return worst


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each batch item's flattened output."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)


def to_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in fp16, inputs and outputs as in fp32 (so callers do not change)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
    topological_sort(model.graph)  # the converter appends the input casts at the end
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        blocked = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {blocked[0].name}")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)


def to_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights (per output channel); activations quantised per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
    except Exception as err:  # noqa: BLE001  (the pre-pass only helps; quantise the graph as it is)
        LOG.warning("%s: quantisation pre-processing failed (%s); quantising without it", src.name, err)
        shutil.copyfile(src, prepared)
    try:
        # uint8 weights (u8 x u8): on CPUs without VNNI (AVX2, AVX-512 before VNNI) onnxruntime's u8 x s8 kernels
        # saturate their 16-bit sums; there int8 weights failed the cosine check (0.995, and 0.998 with
        # reduce_range, < 0.999) while uint8 ones pass
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        prepared.unlink(missing_ok=True)


REDUCED_PRECISIONS = {"fp16": to_fp16, "int8": to_int8}


def check_cosine(graph: Graph, fp32_path: Path, reduced_path: Path, min_cosine: float = REDUCED_MIN_COSINE) -> float:
    """Smallest per-item cosine similarity of the reduced-precision graph's outputs to fp32's."""
    inputs = {k: v.numpy() for k, v in graph.inputs.items()}
    worst = 1.0
    for name, a, b in zip(graph.outputs, _run_onnx(fp32_path, inputs), _run_onnx(reduced_path, inputs)):
        cos = row_cosines(a, b)
        worst = min(worst, float(cos.min()) if cos.size else 1.0)
    if not worst >= min_cosine:
        raise ParityError(f"{reduced_path.name}: cosine to fp32 = {worst:.5f} < {min_cosine}")
    return worst


def export_graph(graph: Graph, out: Path, precisions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Export one graph, check parity, add the reduced-precision copies asked for; its manifest entry.

    ``precisions``: any of "fp16" (GPUs) and "int8" (CPUs: dynamic quantisation), each written as
    ``<graph>.<precision>.onnx`` and checked by cosine similarity to fp32.
    """
    path = out / f"{graph.name}.onnx"
    started = time.perf_counter()
    to_onnx(graph, path)
    entry = {"file": path.name, "sha256": sha256(path), "inputs": list(graph.inputs), "outputs": graph.outputs,
             "input_dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in graph.inputs.items()},
             "max_abs_diff_fp32": check_fp32(graph, path)}
    for precision in precisions:
        reduced = out / f"{graph.name}.{precision}.onnx"
        REDUCED_PRECISIONS[precision](path, reduced)
        entry[precision] = {"file": reduced.name, "sha256": sha256(reduced),
                            "min_cosine_to_fp32": check_cosine(graph, path, reduced)}
    LOG.info("%s: exported in %.1fs, max |diff| %.2g%s", path.name, time.perf_counter() - started,
             entry["max_abs_diff_fp32"],
             "".join(f", {p} cosine {entry[p]['min_cosine_to_fp32']:.5f}" for p in precisions))
    return entry


# --------------------------------------------------------------------------- preprocessing, tokenizer


def preprocess_meta(clip: nn.Module) -> dict[str, Any]:
    cfg = clip.visual.preprocess_cfg
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise ConfigError(f"resize_mode {cfg['resize_mode']!r} has no NumPy preprocessing (shortest, squash)")
    return {"size": image_size(clip), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "interpolation": cfg.get("interpolation", "bicubic"), "resize_mode": cfg.get("resize_mode", "shortest")}


def tokenizer_meta(tokenizer: Any, out: Path) -> dict[str, Any]:
    """Copy the BPE merges file; the NumPy tokenizer covers open_clip's SimpleTokenizer only."""
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise ConfigError(f"the NumPy tokenizer re-implements open_clip's SimpleTokenizer; this model uses "
                          f"{type(tokenizer).__name__}")
    if tokenizer.reduction_fn is not None:
        raise ConfigError("tokenizers with a reduction mask are not supported by the NumPy tokenizer")
    clean = {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
             "_clean_canonicalize": "canonicalize"}[tokenizer.clean_fn.__name__]
    if len(tokenizer.encoder) != 49408:
        raise ConfigError("additional special tokens are not supported by the NumPy tokenizer")
    source = Path(open_clip.tokenizer.default_bpe())
    shutil.copyfile(source, out / source.name)
    return {"type": "clip_bpe", "bpe_file": source.name, "bpe_sha256": sha256(out / source.name),
            "context_length": int(tokenizer.context_length), "clean": clean}


def versions() -> dict[str, str]:
    import onnxscript

    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("multiclip")
    except PackageNotFoundError:
        own = "unknown"
    return {"multiclip": own, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def export_model(model: MultiTaskModel, backbone: Backbone, out: str | Path, fp16: bool = False, int8: bool = False,
                 model_name: str = "", source: str = "", tasks: list[str] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Export the towers and every head with a registered exporter; write and return the manifest.

    Args:
        model: the multi-task model in eval mode (weights loaded).
        backbone: its :class:`Backbone` (tokenizer, transforms).
        out: output folder (created).
        fp16: also write ``<graph>.fp16.onnx`` checked by cosine to fp32.
        int8: also write int8 towers (``image_encoder.int8.onnx``, ``text_encoder.int8.onnx``; dynamic
            quantisation for CPUs), checked by cosine to fp32. Heads are small and stay fp32.
        tasks: heads to export (default: all of the model's).
        overwrite: replace an earlier export in ``out`` (a folder with a manifest.json); a non-empty
            folder without one is never touched.

    The export is written into a temporary sibling of ``out`` and swapped in whole once every graph has
    passed its check, so a killed export leaves the previous one (or nothing), never a mix.
    Raises:
        ParityError: a graph's onnxruntime outputs differ from torch's.
        ConfigError: a head without an exporter, or a tokenizer/preprocessing without a NumPy twin.
    """
    tasks = list(model.heads) if tasks is None else tasks
    unknown = [t for t in tasks if t not in model.heads]
    if unknown:
        raise ConfigError(f"task(s) {unknown} are not heads of this model (heads: {sorted(model.heads)})")
    missing = [t for t in tasks if not model.heads[t].exports_onnx()]
    if missing:
        raise ConfigError(f"task(s) {missing} define no ONNX export (Task.export_onnx)")
    with replacing_dir(out, MANIFEST, overwrite) as tmp:
        return _write_export(model, backbone, tmp, fp16, int8, model_name, source, tasks)


def _write_export(model: MultiTaskModel, backbone: Backbone, out: Path, fp16: bool, int8: bool, model_name: str,
                  source: str, tasks: list[str]) -> dict[str, Any]:
    model.eval()
    manifest: dict[str, Any] = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source,
        "model_name": model_name, "embed_dim": backbone.embed_dim, "versions": versions(),
        "preprocess": preprocess_meta(backbone.model), "tokenizer": tokenizer_meta(backbone.tokenizer, out),
        "graphs": {}, "tasks": {}, "files": {},
    }
    fp16_only = ("fp16",) if fp16 else ()
    towers = backbone_graphs(backbone)
    features = ImageEncoder(backbone.model)(fixed_images(backbone)).detach()
    heads: dict[str, HeadExport] = {task: model.heads[task].export_onnx(backbone, features) for task in tasks}
    with progress_bar(total=len(towers) + sum(len(h.graphs) for h in heads.values()), desc="export",
                      unit="graph") as bar:  # one step per graph: export + parity check (+ fp16/int8 copies)
        for graph in towers:
            manifest["graphs"][graph.name] = export_graph(graph, out, fp16_only + (("int8",) if int8 else ()))
            bar.update(1)
        for head in heads.values():
            for graph in head.graphs:
                manifest["graphs"][graph.name] = export_graph(graph, out, fp16_only)
                bar.update(1)
    for task, head in heads.items():
        for name, array in head.arrays.items():
            np.save(out / f"{name}.npy", array)  # inside the temporary folder: swapped in whole
            manifest["files"][f"{name}.npy"] = sha256(out / f"{name}.npy")
        for name, document in head.documents.items():
            (out / f"{name}.json").write_text(json.dumps(document, indent=1))
            manifest["files"][f"{name}.json"] = sha256(out / f"{name}.json")
        for folder, write in head.files.items():
            write(out / folder)
            for path in sorted((out / folder).rglob("*")):
                if path.is_file():
                    manifest["files"][str(path.relative_to(out))] = sha256(path)
        manifest["tasks"][task] = {"graphs": [g.name for g in head.graphs], **head.meta}
    manifest["files"][manifest["tokenizer"]["bpe_file"]] = manifest["tokenizer"]["bpe_sha256"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a folder without it is unfinished
    return manifest


def export_pretrained(name: str, pretrained: str | None, out: str | Path, fp16: bool = False, int8: bool = False,
                      model_config_dir: str = "configs/models", overwrite: bool = False) -> dict[str, Any]:
    """Export a plain open_clip model (name + pretrained tag or checkpoint file), no training run: the towers
    only, e.g. to extract features with a released model."""
    from training.config import ModelConfig
    from training.backbone import create_backbone

    backbone = create_backbone(ModelConfig(name=name, pretrained=pretrained, model_config_dir=model_config_dir))
    model = MultiTaskModel(backbone.model, {}, {}).eval()
    return export_model(model, backbone, out, fp16, int8, model_name=name, source=f"open_clip:{name}:{pretrained}",
                        overwrite=overwrite)


def export_run(run_dir: str | Path, out: str | Path, fp16: bool = False, int8: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
    """Export a finished training run (``runs/<name>``); see :func:`export_model`."""
    model, backbone, raw = load_run(run_dir)
    return export_model(model, backbone, out, fp16, int8, model_name=raw["model"]["name"],
                        source=str(Path(run_dir).resolve()), overwrite=overwrite)
