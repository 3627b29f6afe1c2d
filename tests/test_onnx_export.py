"""ONNX export of a trained run: every graph checked against torch, tokenizer and preprocessing twins."""
from __future__ import annotations

import json
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import ROOT, _run, tiny_config, trained_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, retrieval_shards, time_shards, geo_shards):
    return trained_export(tmp_path_factory, retrieval_shards, time_shards, geo_shards)


def test_every_head_is_exported_with_parity(exported):
    from training.export.exporter import FP32_TOLERANCE, sha256

    _, export = exported
    manifest = json.loads((export / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"retrieval", "time", "geo_time"}
    expected = {"image_encoder", "text_encoder", "time_head", "geo_time_encoder",
                "geo_time_relevance_location", "geo_time_relevance_time"}
    assert set(manifest["graphs"]) == expected
    for name, graph in manifest["graphs"].items():
        assert graph["max_abs_diff_fp32"] <= FP32_TOLERANCE, name
        assert sha256(export / graph["file"]) == graph["sha256"]
    for name, digest in manifest["files"].items():
        assert sha256(export / name) == digest
    assert manifest["preprocess"]["size"] == 64 and manifest["tokenizer"]["context_length"] == 32
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]


def test_batch_axis_is_dynamic(exported):
    import onnxruntime as ort

    _, export = exported
    session = ort.InferenceSession(str(export / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        out = session.run(None, {"pixels": np.zeros((batch, 3, 64, 64), np.float32)})[0]
        assert out.shape == (batch, 64)


def test_reduced_precision_copies_are_checked_by_cosine(exported, tmp_path):
    """fp16 and int8 copies of the trained image tower: smaller files, cosine >= 0.999 to fp32, loadable."""
    from training.export.exporter import Graph, ImageEncoder, export_graph, fixed_images
    from training.runs import load_run
    from serving.runtime import RuntimeOptions, Session

    run, _ = exported
    model, backbone, _ = load_run(run)
    graph = Graph("image_encoder", ImageEncoder(backbone.model), {"pixels": fixed_images(backbone)}, ["image_features"])
    entry = export_graph(graph, tmp_path, ("fp16", "int8"))
    fp32_size = (tmp_path / "image_encoder.onnx").stat().st_size
    for precision, max_size in (("fp16", 0.7), ("int8", 0.5)):
        assert entry[precision]["min_cosine_to_fp32"] >= 0.999
        assert (tmp_path / entry[precision]["file"]).stat().st_size < max_size * fp32_size
    ops = {node.op_type for node in __import__("onnx").load(str(tmp_path / entry["int8"]["file"])).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    session = Session(tmp_path / entry["int8"]["file"], RuntimeOptions(providers=("cpu",), int8=True))
    assert session.run(pixels=fixed_images(backbone).numpy())["image_features"].shape[0] == len(fixed_images(backbone))


def test_reduced_precision_below_the_cosine_bound_is_loud(exported, tmp_path):
    from training.export.exporter import Graph, ImageEncoder, ParityError, check_cosine, export_graph, fixed_images
    from training.runs import load_run

    run, _ = exported
    _, backbone, _ = load_run(run)
    graph = Graph("image_encoder", ImageEncoder(backbone.model), {"pixels": fixed_images(backbone)}, ["image_features"])
    entry = export_graph(graph, tmp_path, ("int8",))
    with pytest.raises(ParityError, match="image_encoder.int8.onnx: cosine to fp32"):
        check_cosine(graph, tmp_path / entry["file"], tmp_path / entry["int8"]["file"], min_cosine=1.0 + 1e-9)


def test_parity_failure_is_loud(tmp_path):
    """A graph compared with a module whose weights differ: the check raises, naming the file."""
    from training.export.exporter import Graph, ParityError, check_fp32, to_onnx

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU())
    graph = Graph("tiny", module, {"x": torch.randn(3, 8)}, ["y"])
    to_onnx(graph, tmp_path / "tiny.onnx")
    assert check_fp32(graph, tmp_path / "tiny.onnx") <= 1e-6
    with torch.no_grad():
        module[0].bias += 1e-3
    with pytest.raises(ParityError, match="tiny.onnx"):
        check_fp32(graph, tmp_path / "tiny.onnx")


def test_task_without_exporter_is_refused(exported, tmp_path):
    from training.config import ConfigError
    from training.export.exporter import export_model
    from training.runs import load_run
    from training.tasks.base import Task

    class NoExport(Task):
        name = "no_export"

    run, _ = exported
    model, backbone, _ = load_run(run)
    model.heads["no_export"] = NoExport(NoExport.Options(), backbone)
    with pytest.raises(ConfigError, match="not heads of this model"):
        export_model(model, backbone, tmp_path / "a", tasks=["no_such_task"])
    with pytest.raises(ConfigError, match=r"\['no_export'\] define no ONNX export"):
        export_model(model, backbone, tmp_path / "b", tasks=["time", "no_export"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing


TEXTS = ["a photo of a red circle", "Two BLUE squares, at the bottom-right!", "it's 5 o'clock &amp; we're late",
         "café naïve 東京 🙂", "  lots   of\twhitespace\n", "", "x" * 300,
         " ".join(["word"] * 60), "a photo taken in May, 2017"]


@pytest.mark.parametrize("context_length", [32, 77])
def test_numpy_tokenizer_matches_open_clip(context_length):
    from serving.tokenizer import BPETokenizer

    ours = BPETokenizer(open_clip.tokenizer.default_bpe(), context_length)
    theirs = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    assert np.array_equal(ours(TEXTS), theirs(TEXTS).numpy())


def test_numpy_preprocessing_matches_open_clip():
    from serving.preprocess import Preprocess

    open_clip.add_model_config(ROOT / "configs" / "models")
    _, _, preprocess_val = open_clip.create_model_and_transforms("tiny-vit")
    ours = Preprocess(64, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    rng = np.random.default_rng(0)
    for size, mode in [((64, 64), "RGB"), ((100, 41), "RGB"), ((33, 97), "RGBA"), ((20, 20), "L"), ((301, 200), "P")]:
        pixels = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA" if mode == "RGBA" else "RGB")
        image = image.convert(mode) if mode in ("L", "P") else image
        np.testing.assert_allclose(ours(image), preprocess_val(image).numpy(), atol=1e-6, err_msg=f"{size} {mode}")


def test_contextual_scorer_exports_with_parity(tmp_path):
    """The ContextualCLIP head (transformer over the set, fusion scale 1000) in onnxruntime, untrained."""
    from training.export.exporter import FP32_TOLERANCE, ImageEncoder, export_graph, fixed_images
    from training.validation import config_from_dict
    from training.model import build_model

    raw = tiny_config(tmp_path, tmp_path / "run", tasks=[{"name": "contextual", "options": {"ffn_dim": 128}}])
    model, backbone = build_model(config_from_dict(raw))
    model.eval()
    head = model.heads["contextual"].export_onnx(backbone, ImageEncoder(backbone.model)(fixed_images(backbone)).detach())
    entry = export_graph(head.graphs[0], tmp_path)
    assert entry["inputs"] == ["frames", "text", "static"] and entry["max_abs_diff_fp32"] <= FP32_TOLERANCE


def test_a_plain_open_clip_model_exports_without_a_run(exported, tmp_path):
    """launch/export.py --model NAME --pretrained FILE: the towers of an open_clip checkpoint, no training run;
    here the run's own backbone file (final/open_clip.safetensors), so both exports must embed alike."""
    from serving.extract import OnnxExportEncoder

    run, run_export = exported
    out = tmp_path / "plain"
    proc = _run([sys.executable, "launch/export.py", "--model", "tiny-vit", "--pretrained",
                 str(run / "final" / "open_clip.safetensors"), "--model-config-dir", str(ROOT / "configs" / "models"),
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == {} and set(manifest["graphs"]) == {"image_encoder", "text_encoder"}
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    plain, trained = OnnxExportEncoder(out).encode(pixels), OnnxExportEncoder(run_export).encode(pixels)
    np.testing.assert_allclose(plain["image_embedding"], trained["image_embedding"], atol=1e-5)
    assert OnnxExportEncoder(out).encode_text(["a red circle"]).shape == (1, 64)


def test_a_killed_re_export_leaves_the_previous_export_whole(exported, tmp_path, monkeypatch):
    """The export is built in a temporary sibling and swapped in: a failure midway (here: the last head's
    export raising) leaves the earlier export byte for byte, and no temporary folder behind."""
    from training.export import exporter
    from training.runs import load_run

    run, _ = exported
    model, backbone, raw = load_run(run)
    out = tmp_path / "export"
    exporter.export_model(model, backbone, out, tasks=["time"], model_name="tiny-vit")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        exporter.export_model(model, backbone, out, tasks=["time"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(type(model.heads["time"]), "export_onnx", killed)
    with torch.no_grad():
        model.backbone.visual.proj.add_(1.0)  # another model: its towers are written first, then the kill
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(model, backbone, out, tasks=["time"], overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the temporary folder is gone
    stranger = tmp_path / "not_an_export"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by this tool"):
        exporter.export_model(model, backbone, stranger, tasks=["time"], overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_inference_refuses_a_graph_swapped_in_from_another_export(exported, tmp_path):
    import shutil

    from serving.model import ExportedModel

    _, export = exported
    mixed = tmp_path / "mixed"
    shutil.copytree(export, mixed)
    other = tmp_path / "other.onnx"
    shutil.copyfile(export / "time_head.onnx", other)
    (mixed / "image_encoder.onnx").write_bytes(other.read_bytes())  # a well-formed graph, not this export's
    model = ExportedModel(mixed)
    with pytest.raises(ValueError, match="image_encoder.onnx: sha256 differs"):
        model.session("image_encoder")
    model.session("time_head")  # the untouched graphs still open
    ExportedModel(mixed, verify=False).session("image_encoder")  # --no-verify: runs, with a warning
