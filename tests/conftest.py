"""Shared fixtures: synthetic shards generated once per session, run folders per test.

The suite runs on pytest-xdist workers (``make test``: ``-n 2 --dist loadfile``, a module's tests on one
worker). What several modules share (shard sets, the trained-and-exported runs) is built once per test
run under :func:`shared_cache`, not once per worker.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

# The suite runs on DeepSpeed's CPU accelerator, on a GPU host too: every test (and every process it
# starts, which inherits this environment) sees no CUDA device. tests/test_gpu.py runs its checks in
# subprocesses with GPU_ENV, the environment as it was before this.
GPU_ENV = dict(os.environ)
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# On pytest-xdist workers the cores are split between the workers (this process and all it starts: the
# trainer takes OMP_NUM_THREADS as given). With a thread per core in each worker, OpenMP's spin-waiting
# threads oversubscribed the CPU: 2 workers ran the suite no faster than 1 (and used 43 % more CPU time).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import training  # noqa: E402,F401  (torchvision compatibility before anything imports open_clip)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def export_untrained(cfg, out: Path):
    """Export the model ``cfg`` builds, untrained (seed 0), through the real exporter; returns the backbone
    (what serving tests compare with, without a training run)."""
    import torch

    from training.export.exporter import export_model
    from training.model import build_model

    torch.manual_seed(0)
    model, backbone = build_model(cfg)
    model.eval()
    for head in model.heads.values():
        head.prepare(model.backbone)
    export_model(model, backbone, out, model_name=cfg.model.name, source="test")
    return backbone


@contextlib.contextmanager
def shared_cache(tmp_path_factory, name: str):
    """The folder ``name`` shared by every xdist worker of this run (each worker has its own base temp:
    the shared one is its parent), held under a file lock: the first worker to come builds it, the others
    wait, then find it built. Without xdist it is the session's base temp. Build into it only when the
    builder's own completion marker is missing."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with FileLock(str(root / f"{name}.lock")):
        yield root / name


def _synth(tmp_path_factory, task: str, n_train: int = 1600, n_val: int = 200) -> Path:
    from shards.synth import generate

    with shared_cache(tmp_path_factory, f"synth-{task}-{n_train}-{n_val}") as root:
        out = root / task
        if not (out / "meta.json").is_file():  # written last by generate
            shutil.rmtree(root, ignore_errors=True)
            generate(out, task=task, n_train=n_train, n_val=n_val, seed=0, shard_size=200, image_size=64)
    return out


@pytest.fixture(scope="session")
def retrieval_shards(tmp_path_factory) -> Path:
    """Small retrieval shard set (8 train shards, 2 val shards) shared by the whole session."""
    return _synth(tmp_path_factory, "retrieval")


def tiny_config(shards: Path, run_dir: Path, **sections) -> dict:
    """A raw config dict for the tiny model on ``shards``; ``sections`` update top-level sections."""
    raw = {
        "run": {"output_dir": str(run_dir), "seed": 0},
        "model": {"name": "tiny-vit", "model_config_dir": str(ROOT / "configs" / "models")},
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "num_workers": 1,
                 "shuffle_buffer": 100},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": 16, "max_steps": 4, "lr_backbone": 1e-3, "lr_head": 1e-3,
                  "warmup_steps": 1},
        "schedule": {"log_every": 1},
        "eval": {"batch_size": 100, "max_samples": 100},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="session")
def time_shards(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory, "time")


@pytest.fixture(scope="session")
def geo_shards(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory, "geo_time", n_train=2400)


def run_infer_cli(args: list[str], forbidden: tuple[str, ...], env: dict[str, str] | None = None,
                  prelude: str = "") -> subprocess.CompletedProcess:
    """launch/infer.py with ``args`` in a fresh interpreter; it must succeed without importing ``forbidden``.

    ``env``: variables added to this process's environment (e.g. ``MULTICLIP_PLUGINS``, ``PYTHONPATH``).
    ``prelude``: Python run first in that interpreter (e.g. onnxruntime's provider list as another build
    lists it)."""
    script = (f"import runpy, sys\n{prelude}\nsys.argv = ['infer.py', *{args!r}]\n"
              "try:\n    runpy.run_path('launch/infer.py', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
              "print('HEAVY', bad)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]
    return proc


# --------------------------------------------------------------------------- running the entry points


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(cmd: list[str], timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root; ``env`` adds variables (a ``PYTHONPATH`` there goes after the root)."""
    extra = dict(env or {})
    path = os.pathsep.join([str(ROOT), *([extra.pop("PYTHONPATH")] if "PYTHONPATH" in extra else [])])
    full = {**os.environ, **extra, "PYTHONPATH": path}  # CPU accelerator, no CUDA: see conftest
    proc = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    return proc


def _train(config: Path, *extra: str, ranks: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "launch/train.py", "--config", str(config), *extra]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(_free_port()),
               "launch/train.py", "--config", str(config), *extra]
    return _run(cmd, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# --------------------------------------------------------------------------- trained runs shared by several test modules


def trained_export(tmp_path_factory, retrieval_shards, time_shards, geo_shards) -> tuple[Path, Path]:
    """One tiny 3-task run (retrieval, time, geo_time) trained with the real launcher, then exported.

    Built once per test run (:func:`shared_cache`), so both ONNX test modules share one run and one export.
    """
    with shared_cache(tmp_path_factory, "onnx") as base:
        run, export = base / "run", base / "export"
        if not (export / "manifest.json").is_file():  # written last by the exporter
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            _train_and_export(base, run, export, retrieval_shards, time_shards, geo_shards)
    return run, export


def _train_and_export(base: Path, run: Path, export: Path, retrieval_shards: Path, time_shards: Path,
                      geo_shards: Path) -> None:
    geo_options = {"num_cls_tokens": 2, "knowledge_corpus": str(geo_shards / "knowledge.txt"),
                   "labels_file": str(geo_shards / "labels.json"), "relevance_hidden": 32, "knowledge_top_k": 2}
    tasks = [{"name": "retrieval", "train": str(retrieval_shards / "train"), "val": str(retrieval_shards / "val")},
             {"name": "time", "train": str(time_shards / "train"), "val": str(time_shards / "val"),
              "options": {"hidden": [32, 64], "encoding": "cyclic"}},
             {"name": "geo_time", "train": str(geo_shards / "train"), "val": str(geo_shards / "val"), "options": geo_options}]
    raw = tiny_config(retrieval_shards, run, tasks=tasks, optim={"max_steps": 12, "micro_batch_size": 32, "warmup_steps": 2},
                      schedule={"log_every": 6}, eval={"max_samples": None, "batch_size": 200})
    raw.pop("data")
    raw["data"] = {"num_workers": 1, "shuffle_buffer": 100}
    proc = _train(_write_config(base, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export), "--int8"])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def geo_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, shard root) of a tiny geo_time run trained for a few steps with the real launcher;
    built once per test run (:func:`shared_cache`): test_ray_extract and test_ray_search both use it."""
    with shared_cache(tmp_path_factory, "ray_geo") as root:
        shards, run = root / "shards", root / "run"
        if not (run / "final" / "config.json").is_file():  # written last into final/
            shutil.rmtree(root, ignore_errors=True)
            _train_geo_run(root, shards, run)
    return run, shards


def _train_geo_run(root: Path, shards: Path, run: Path) -> None:
    from shards.synth import generate

    generate(shards, task="geo_time", n_train=160, n_val=120, seed=0, shard_size=40, image_size=64)
    options = {"num_cls_tokens": 2, "stage": "quantity", "knowledge_corpus": str(shards / "knowledge.txt"),
               "labels_file": str(shards / "labels.json")}
    raw = tiny_config(shards, run, tasks=[{"name": "geo_time", "options": options}],
                      optim={"max_steps": 2, "micro_batch_size": 16}, eval={"max_samples": 20, "batch_size": 20})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # CPU accelerator: see conftest
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def in_process_embeddings(run: Path, shard_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """The reference: training's own eval loader and the geo_time head's encode, in this process."""
    import torch

    from training.validation import config_from_dict
    from training.data import eval_loader
    from training.evaluation import load_weights
    from training.model import build_model

    cfg = config_from_dict(json.loads((run / "final" / "config.json").read_text()))
    model, backbone = build_model(cfg)
    load_weights(model, run)
    model.eval()
    task = model.heads["geo_time"]
    out: dict[str, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for batch in eval_loader(str(shard_dir), task, backbone, 50):
            image, tokens = task.encode(model.backbone, batch["image"])
            plain = torch.nn.functional.normalize(model.backbone.encode_image(batch["image"]), dim=-1)
            for i, key in enumerate(batch["key"]):
                out[key] = {"image_embedding": plain[i].numpy(), "geo_time_image": image[i].numpy(),
                            "geo_time_location_cls": tokens["location"][i].numpy(),
                            "geo_time_time_cls": tokens["time"][i].numpy()}
    return out
