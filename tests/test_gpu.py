"""GPU checks: skipped cleanly without CUDA (CI never has one); run by benchmarks/gpu_check.sh on a GPU node.

The rest of the suite hides CUDA (conftest), so every check here runs in a subprocess with the
environment as it was (``GPU_ENV``): DeepSpeed's accelerator is CUDA there, the backend NCCL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GPU_ENV, ROOT, _synth, tiny_config
from training.trainer import weights_digest


@lru_cache(maxsize=1)
def cuda_reason() -> str | None:
    """None when a CUDA device is usable in GPU_ENV, else why not (checked without touching CUDA here)."""
    if GPU_ENV.get("CUDA_VISIBLE_DEVICES") == "" or GPU_ENV.get("DS_ACCELERATOR") == "cpu":
        return "CUDA hidden by the environment (CUDA_VISIBLE_DEVICES='' or DS_ACCELERATOR=cpu)"
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia")):
        return "no NVIDIA driver on this machine"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=GPU_ENV, capture_output=True, text=True, timeout=120)
    return None if probe.stdout.strip() == "True" else f"torch.cuda.is_available() is False ({torch.__version__})"


pytestmark = pytest.mark.skipif(cuda_reason() is not None, reason=f"needs a CUDA GPU: {cuda_reason()}")


def _gpu_run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**GPU_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _train_on_gpu(tmp_path: Path, raw: dict) -> subprocess.CompletedProcess:
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return _gpu_run([sys.executable, "launch/train.py", "--config", str(config)])


def _audit_digest(run: Path) -> set[str]:
    return {json.loads(p.read_text())["sha256"] for p in (run / "audit").glob("weights-rank*.json")}


def test_every_head_trains_in_bf16_on_one_gpu(retrieval_shards, time_shards, geo_shards, tmp_path_factory, tmp_path):
    contextual = _synth(tmp_path_factory, "contextual", n_train=200, n_val=40)
    meme = _synth(tmp_path_factory, "meme", n_train=200, n_val=40)
    shards = {"retrieval": retrieval_shards, "time": time_shards, "geo_time": geo_shards,
              "contextual": contextual, "meme": meme}
    options = {"time": {"hidden": [32, 64]}, "contextual": {"ffn_dim": 64},
               "geo_time": {"num_cls_tokens": 2, "knowledge_corpus": str(geo_shards / "knowledge.txt"),
                            "labels_file": str(geo_shards / "labels.json"), "knowledge_top_k": 2},
               "meme": {"bert": str(meme / "bert-tiny"), "heads": 8}}
    tasks = [{"name": n, "train": str(p / "train"), "val": str(p / "val"), "options": options.get(n, {})}
             for n, p in shards.items()]
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, tasks=tasks, run={"audit": True}, deepspeed={"precision": "auto"},
                      optim={"max_steps": 10, "micro_batch_size": 16}, eval={"max_samples": 40, "batch_size": 40})
    raw["data"] = {"shuffle_buffer": 20}
    proc = _train_on_gpu(tmp_path, raw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cuda:0, backend nccl, precision bf16" in proc.stdout + proc.stderr
    final = load_file(str(run / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values() if v.is_floating_point())
    assert _audit_digest(run) == {weights_digest(final)}
    train = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("peak_memory_gib") for r in train if r["kind"] == "train")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage_on_one_gpu_writes_the_masters(retrieval_shards, tmp_path, stage):
    run = tmp_path / "run"
    raw = tiny_config(retrieval_shards, run, run={"audit": True}, deepspeed={"zero_stage": stage, "precision": "bf16"},
                      optim={"max_steps": 4}, eval={"max_samples": 40, "batch_size": 40})
    proc = _train_on_gpu(tmp_path, raw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"precision bf16, ZeRO {stage}, world 1" in proc.stdout + proc.stderr
    final = load_file(str(run / "final" / "model.safetensors"))
    assert _audit_digest(run) == {weights_digest(final)}
    conv = final["backbone.visual.conv1.weight"]
    assert not torch.equal(conv, conv.to(torch.bfloat16).float())  # fp32 masters, not a bf16 copy


ORT_CHECK = textwrap.dedent('''
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from serving.runtime import RuntimeOptions, Session

    graph, providers, want_fp16 = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3] == "fp16"
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    cpu = Session(graph, RuntimeOptions(providers=("cpu",)))
    gpu = Session(graph.replace(".onnx", ".fp16.onnx") if want_fp16 else graph,
                  RuntimeOptions(providers=providers, fp16=want_fp16, require_gpu=True))
    ref = next(iter(cpu.run(**{cpu.input_names[0]: x}).values()))
    out = next(iter(gpu.run(**{gpu.input_names[0]: x}).values())).astype(np.float32)
    cos = float(np.min(np.sum(ref * out, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)))
    print(json.dumps({"in_use": gpu.session.get_providers(), "max_abs": float(np.abs(ref - out).max()),
                      "min_cosine": cos, "io_binding": bool(gpu.on_gpu)}))
''')


@pytest.fixture(scope="module")
def exported_tower(retrieval_shards, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("gpu_onnx")
    raw = tiny_config(retrieval_shards, base / "run", optim={"max_steps": 2}, eval={"max_samples": 20, "batch_size": 20})
    raw["deepspeed"] = {"precision": "fp32"}
    proc = _train_on_gpu(base, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _gpu_run([sys.executable, "launch/export.py", "--checkpoint", str(base / "run"), "--out", str(base / "onnx"),
                     "--fp16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((base / "onnx" / "manifest.json").read_text())
    return base / "onnx" / manifest["graphs"]["image_encoder"]["file"]


def _ort_providers() -> list[str]:
    probe = _gpu_run([sys.executable, "-c", "import onnxruntime as o; print(','.join(o.get_available_providers()))"])
    return probe.stdout.strip().split(",")


def _tensorrt_libraries() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_cuda_runs_on_the_gpu(exported_tower, precision):
    if "CUDAExecutionProvider" not in _ort_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    proc = _gpu_run([sys.executable, "-c", ORT_CHECK, str(exported_tower), "cuda", precision])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["in_use"][0] == "CUDAExecutionProvider", result  # really in use, not a silent CPU fallback
    assert result["io_binding"]
    if precision == "fp32":
        assert result["max_abs"] < 1e-3, result
    else:
        assert result["min_cosine"] > 0.999, result


def test_onnxruntime_tensorrt_when_its_libraries_are_present(exported_tower):
    if "TensorrtExecutionProvider" not in _ort_providers() or not _tensorrt_libraries():
        pytest.skip("TensorRT 10 libraries (libnvinfer.so.10) or onnxruntime's TensorRT provider missing")
    proc = _gpu_run([sys.executable, "-c", ORT_CHECK, str(exported_tower), "tensorrt,cuda", "fp32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["in_use"][0] == "TensorrtExecutionProvider", result
    assert result["min_cosine"] > 0.999, result


def test_gpu_env_really_has_a_device():
    proc = _gpu_run([sys.executable, "-c", "from training import accelerator as a; print(a.device_type(), a.backend(), "
                     "a.resolve_precision('auto'))"])
    assert proc.stdout.split() == ["cuda", "nccl", "bf16"], proc.stdout + proc.stderr
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # this process (the rest of the suite) still sees none
