"""The one-call GPU check, dry-run on CPU: every step runs (tiny model), GPU-only parts skip, outputs as documented."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_writes_its_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_BENCH_WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.txt", "env.txt", "gpu_bench.json", "test_gpu.txt", "train_log.jsonl", "train_output.txt"]
    assert len(files) <= 8  # the device tool's budget for one call
    env_txt = (out / "env.txt").read_text()
    assert "MISSING" not in env_txt and "open_clip 3.3.0" in env_txt
    assert "skipped" in (out / "test_gpu.txt").read_text()  # no CUDA here: every GPU test skips cleanly
    bench = json.loads((out / "gpu_bench.json").read_text())
    assert bench["dry_run"] and bench["train_rc"] == 0
    assert bench["train_samples_per_s_per_gpu"] > 0 and bench["train_flops_per_sample"] > 0
    assert bench["image_tower_bf16_images_per_s"] > 0
    assert "precision fp32, ZeRO 0, world 1" in (out / "train_output.txt").read_text()
