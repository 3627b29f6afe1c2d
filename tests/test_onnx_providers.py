"""Serving says what it runs on: requested vs in-use providers, fallback reasons, the fp16 guard, TensorRT profiles.

CPU only, with real onnxruntime sessions on a tiny exported tower (and, for summary.json, the tiny
trained export that tests/test_onnx_infer.py uses). "onnxruntime-gpu lists CUDA but its libraries do
not load" is reproduced on the CPU build by making ``get_available_providers`` list CUDA and
TensorRT: onnxruntime then drops them when the session is made, just as it does with missing
CUDA/cuDNN libraries.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, run_infer_cli

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
# onnxruntime as its CPU build lists its providers, on the GPU build too (the CLI test's fresh interpreters
# run it first; the cpu_build fixture does the same in this process)
CPU_BUILD_PRELUDE = ("import onnxruntime as ort; _real = ort.get_available_providers; "
                     f"ort.get_available_providers = lambda: [p for p in _real() if p not in {(TRT, CUDA)!r}]")
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # onnxruntime's, on the faked lists


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch):
    """Each test sees the once-per-process warnings and provider probes afresh."""
    from serving import runtime

    monkeypatch.setattr(runtime, "_reported", set())
    monkeypatch.setattr(runtime, "_probes", {})
    monkeypatch.setattr(runtime, "_preloaded", [])


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    """A tiny conv + LayerNorm + Linear "image tower" exported (dynamic batch) with its fp16 copy."""
    import torch

    from training.export.exporter import Graph, export_graph

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.LayerNorm(8), torch.nn.Linear(8, 16)

        def forward(self, pixels):
            return self.fc(self.norm(self.conv(pixels).flatten(2).transpose(1, 2))).mean(1)

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tower")
    export_graph(Graph("image_encoder", Tower().eval(), {"pixels": torch.randn(4, 3, 32, 32)}, ["image_features"]),
                 out, ("fp16",))
    return out


@pytest.fixture
def cpu_build(monkeypatch):
    """onnxruntime as its CPU build lists it (on the GPU build too): no CUDA, no TensorRT."""
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [p for p in real() if p not in (TRT, CUDA)])


@pytest.fixture
def gpu_listed_not_loadable(monkeypatch):
    """onnxruntime-gpu without its libraries: CUDA and TensorRT listed, neither loads. Counts preload_dlls calls."""
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, *[p for p in real() if p not in (TRT, CUDA)]])
    calls = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    return calls


def _pixels(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def test_cuda_not_in_this_build_falls_back_to_cpu_and_says_so(tower, caplog, cpu_build):
    from serving.runtime import NOT_IN_BUILD, RuntimeOptions, Session

    with caplog.at_level(logging.INFO, logger="multiclip.serving"):
        session = Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cuda", "cpu")))
        Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cuda", "cpu")))  # a second graph: no new line
    assert session.requested == [CUDA, CPU]
    assert session.providers_in_use == [CPU] and not session.on_gpu
    assert [f["provider"] for f in session.fallbacks] == [CUDA]
    assert session.fallbacks[0]["reason"].startswith(NOT_IN_BUILD)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if f"has no {CUDA}" in w and NOT_IN_BUILD in w]) == 1, warnings
    assert any("image_encoder.onnx runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    assert session.run(pixels=_pixels())["image_features"].shape == (2, 16)
    report = session.report()
    assert report["requested"] == [CUDA, CPU] and report["in_use"] == [CPU] and report["fallbacks"] == session.fallbacks


def test_listed_but_not_loaded_gpu_provider_is_a_named_fallback(tower, caplog, gpu_listed_not_loadable):
    """What onnxruntime-gpu without CUDA/cuDNN does: the session quietly runs on the CPU. Here it is said."""
    from serving.runtime import NOT_LOADED, RuntimeOptions, Session

    with caplog.at_level(logging.WARNING, logger="multiclip.serving"):
        session = Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("tensorrt", "cuda", "cpu")))
    assert session.providers_in_use == [CPU]
    assert session.fallbacks == [{"provider": TRT, "reason": NOT_LOADED}, {"provider": CUDA, "reason": NOT_LOADED}]
    assert gpu_listed_not_loadable == [1]  # preload_dlls, once, as a GPU provider was requested and listed
    lines = [r.getMessage() for r in caplog.records if "not in use" in r.getMessage()]
    assert len(lines) == 2 and all("image_encoder.onnx" in line and NOT_LOADED in line for line in lines), lines


def test_fp16_guard_is_decided_on_the_providers_in_use():
    from serving.runtime import caps_fp16_optimization

    assert caps_fp16_optimization("image_encoder.fp16.onnx", [CPU], ALL)
    assert not caps_fp16_optimization("image_encoder.fp16.onnx", [CUDA, CPU], ALL)
    assert not caps_fp16_optimization("image_encoder.fp16.onnx", [TRT, CUDA, CPU], ALL)
    assert not caps_fp16_optimization("image_encoder.fp16.onnx", [CPU], EXTENDED)  # already capped
    assert not caps_fp16_optimization("image_encoder.onnx", [CPU], ALL)  # fp32 graphs keep every pass


def test_fp16_graph_requested_on_cuda_that_does_not_load_is_capped(tower, monkeypatch, gpu_listed_not_loadable):
    """The request says CUDA, the session runs on the CPU: the cap must follow the CPU.

    The cap has to hold for the first session created, not only after a look at ``get_providers()``:
    on real towers onnxruntime's CPU layout passes crash (segfault) while the session is created.
    """
    from serving.runtime import NOT_LOADED, RuntimeOptions, Session

    levels = []
    real = ort.InferenceSession

    def recording(path, so, **kwargs):
        if isinstance(path, str):  # (the one-node probe graph comes as bytes)
            levels.append((Path(path).name, so.graph_optimization_level))
        return real(path, so, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    fp16 = Session(tower / "image_encoder.fp16.onnx", RuntimeOptions(providers=("cuda", "cpu"), fp16=True))
    assert fp16.providers_in_use == [CPU] and fp16.optimization == "extended"
    assert levels == [("image_encoder.fp16.onnx", EXTENDED)], levels  # never created at ORT_ENABLE_ALL
    assert fp16.fallbacks == [{"provider": CUDA, "reason": NOT_LOADED}]
    fp32 = Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cuda", "cpu")))
    assert fp32.optimization == "all"
    assert fp16.run(pixels=_pixels())["image_features"].shape == (2, 16)


def test_tensorrt_profile_shapes_for_a_dynamic_batch(tower):
    from serving.runtime import graph_input_shapes, tensorrt_profile

    shapes = graph_input_shapes(tower / "image_encoder.onnx")
    assert shapes == {"pixels": [None, 3, 32, 32]}
    assert tensorrt_profile(shapes, 64, 256) == {"trt_profile_min_shapes": "pixels:1x3x32x32",
                                                 "trt_profile_opt_shapes": "pixels:64x3x32x32",
                                                 "trt_profile_max_shapes": "pixels:256x3x32x32"}
    two = {"image": [None, 3, 224, 224], "tokens": [None, 77]}
    assert tensorrt_profile(two, 8, 32) == {"trt_profile_min_shapes": "image:1x3x224x224,tokens:1x77",
                                            "trt_profile_opt_shapes": "image:8x3x224x224,tokens:8x77",
                                            "trt_profile_max_shapes": "image:32x3x224x224,tokens:32x77"}
    with pytest.raises(ValueError, match="dynamic batch axis only"):
        tensorrt_profile({"input_ids": [None, None]}, 8, 32)
    with pytest.raises(ValueError):
        tensorrt_profile(shapes, 512, 256)


def test_towers_get_tensorrt_with_profile_and_caches_heads_never(tower, tmp_path, monkeypatch, gpu_listed_not_loadable):
    """What reaches onnxruntime.InferenceSession when TensorRT and CUDA do load (the probe is told they do)."""
    from serving import runtime
    from serving.runtime import NOT_LOADED, RuntimeOptions, Session

    monkeypatch.setattr(runtime, "probe_provider", lambda name, device_id=0: None)
    seen = []
    real = ort.InferenceSession

    def recording(path, so, providers, provider_options, **kwargs):
        seen.append(dict(zip(providers, provider_options)))
        return real(path, so, providers=providers, provider_options=provider_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    options = RuntimeOptions(trt_cache_dir=str(tmp_path / "trt"), trt_opt_batch=16, trt_max_batch=128)
    session = Session(tower / "image_encoder.onnx", options)
    # the probe said they load, the session still has neither: get_providers() is compared with the plan
    assert session.providers_in_use == [CPU]
    assert session.fallbacks == [{"provider": TRT, "reason": NOT_LOADED}, {"provider": CUDA, "reason": NOT_LOADED}]
    trt = seen[0][TRT]
    assert list(seen[0]) == [TRT, CUDA, CPU]
    assert trt["trt_profile_min_shapes"] == "pixels:1x3x32x32"
    assert trt["trt_profile_opt_shapes"] == "pixels:16x3x32x32"
    assert trt["trt_profile_max_shapes"] == "pixels:128x3x32x32"
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert Path(trt["trt_engine_cache_path"]).is_dir() and trt["trt_timing_cache_path"] == str(tmp_path / "trt")
    head = Session(tower / "image_encoder.onnx", options, allow_tensorrt=False)
    assert list(seen[-1]) == [CUDA, CPU] and not any(k.startswith("trt_") for o in seen[-1].values() for k in o)
    assert head.requested == [CUDA, CPU]


def test_exported_model_sends_only_the_towers_to_tensorrt(exported_model):
    from serving.model import TOWER_GRAPHS, ExportedModel
    from serving.runtime import RuntimeOptions

    model = ExportedModel(exported_model, RuntimeOptions(providers=("tensorrt", "cpu")))
    for graph in model.manifest["graphs"]:
        requested = model.session(graph).requested
        assert requested == ([TRT, CPU] if graph in TOWER_GRAPHS else [CUDA, CPU]), (graph, requested)
    assert set(TOWER_GRAPHS) <= set(model.manifest["graphs"])
    report = model.provider_report()
    assert set(report) == set(model.manifest["graphs"]) and all(r["in_use"][0] for r in report.values())


def test_require_gpu_raises_a_clear_error(tower, cpu_build):
    from serving.runtime import ProviderError, RuntimeOptions, Session

    with pytest.raises(ProviderError, match=r"require_gpu .*CUDAExecutionProvider: not in this onnxruntime build"):
        Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cuda", "cpu"), require_gpu=True))
    with pytest.raises(ProviderError, match="no GPU provider is requested"):
        Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cpu",), require_gpu=True))


def test_require_gpu_raises_when_listed_but_not_loaded(tower, gpu_listed_not_loadable):
    from serving.runtime import NOT_LOADED, ProviderError, RuntimeOptions, Session

    with pytest.raises(ProviderError, match=NOT_LOADED.split(":")[0]):
        Session(tower / "image_encoder.onnx", RuntimeOptions(providers=("cuda", "cpu"), require_gpu=True))


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory, retrieval_shards, time_shards, geo_shards) -> Path:
    from conftest import trained_export

    return trained_export(tmp_path_factory, retrieval_shards, time_shards, geo_shards)[1]


def test_summary_json_of_a_cli_run_records_the_providers(exported_model, time_shards, tmp_path):
    shard = str(time_shards / "val" / "shard-000000.tar")
    proc = run_infer_cli(["--model", str(exported_model), "--shards", shard, "--out", str(tmp_path),
                          "--tasks", "time", "--providers", "cuda", "cpu"], ("torch",), prelude=CPU_BUILD_PRELUDE)
    assert proc.stderr.count(f"has no {CUDA}") == 1, proc.stderr[-2000:]
    providers = json.loads((tmp_path / "summary.json").read_text())["providers"]
    assert set(providers) == {"image_encoder", "time_head"}
    for graph, entry in providers.items():
        assert entry["requested"] == [CUDA, CPU] and entry["in_use"] == [CPU], graph
        assert [f["provider"] for f in entry["fallbacks"]] == [CUDA]
        assert entry["fallbacks"][0]["reason"].startswith("not in this onnxruntime build"), entry
    # --require-gpu: exit 2 with the reason, nothing run on the CPU
    strict = ["--model", str(exported_model), "--shards", shard, "--out", str(tmp_path / "strict"), "--tasks", "time",
              "--providers", "cuda", "cpu", "--require-gpu"]
    script = (f"import runpy, sys\n{CPU_BUILD_PRELUDE}\nsys.argv = ['infer.py', *{strict!r}]\n"
              "runpy.run_path('launch/infer.py', run_name='__main__')")
    failed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "infer error: image_encoder.onnx: require_gpu is set" in failed.stderr
    assert "not in this onnxruntime build" in failed.stderr
