"""An installed package works outside a checkout: console scripts, shipped configs and model JSONs.

A wheel of the project is built from a copy of its sources and installed (``--no-deps``) into a fresh
venv that reuses this environment's dependencies through a ``.pth`` line (no download, torch untouched;
the editable install's finder is not loaded there, as a ``.pth`` in a folder added that way is not run).
Then, from a folder that is not the checkout and without the checkout on ``PYTHONPATH``: synthetic shards,
two training steps of a shipped config named by name, and the report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT

SOURCES = ("pyproject.toml", "README.md", "training", "serving", "shards", "launch", "configs")
SCRIPTS = ["multiclip-train", "multiclip-evaluate", "multiclip-export", "multiclip-infer", "multiclip-extract",
           "multiclip-search", "multiclip-report", "multiclip-cam", "multiclip-compare-retrievers", "multiclip-synth",
           "multiclip-convert"]


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _install(tmp: Path, env: dict[str, str]) -> Path:
    """A fresh venv with the project's wheel in it; returns its bin folder."""
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp / "wheels"
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(src)], cwd=tmp, env=env)
    venv = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    site = Path(_sh([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp, env=env).stdout.strip())
    (site / "_multiclip_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this env's packages
    _sh([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(next(wheels.glob("*.whl")))],
        cwd=tmp, env=env)
    return venv / "bin"


def test_installed_wheel_trains_a_shipped_config_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    bin_dir = _install(tmp_path, env)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    work = tmp_path / "elsewhere"
    work.mkdir()

    missing = [name for name in SCRIPTS if not (bin_dir / name).is_file()]
    assert not missing, f"console scripts not installed: {missing}"

    where = json.loads(_sh([str(bin_dir / "python"), "-c",
                            "import json, sys, training, launch, configs, training.shipped as s; "
                            "print(json.dumps([training.__file__, launch.__file__, str(s.CONFIGS), sys.path]))"],
                           cwd=work, env=env).stdout)
    site = Path(where[0]).parents[1]
    assert ROOT not in Path(where[0]).parents and site.is_relative_to(tmp_path / "venv"), where[0]
    assert all(Path(p).is_relative_to(site) for p in where[1:3]), where
    assert str(ROOT) not in where[3], where[3]  # the checkout is not on sys.path (only its .venv, via the .pth)
    assert (site / "configs" / "retrieval_tiny.yaml").is_file()
    assert (site / "configs" / "models" / "tiny-vit.json").is_file()

    _sh(["multiclip-synth", "--out", "d", "--task", "retrieval", "--train", "64", "--val", "32",
         "--shard-size", "32"], cwd=work, env=env)
    assert not (work / "configs").exists()  # the config and tiny-vit.json below are the installed copies
    train = _sh(["multiclip-train", "--config", "retrieval_tiny", "data.train=d/train", "data.val=d/val",
                 "data.num_workers=0", "data.shuffle_buffer=32", "optim.max_steps=2", "optim.micro_batch_size=16",
                 "optim.warmup_steps=1", "eval.batch_size=32", "run.output_dir=run"], cwd=work, env=env, timeout=600)
    assert '"after"' in train.stdout, train.stdout[-2000:]
    assert (work / "run" / "final" / "model.safetensors").is_file() and (work / "run" / "metrics.json").is_file()
    saved = json.loads((work / "run" / "final" / "config.json").read_text())
    assert saved["model"]["model_config_dir"] == "configs/models"  # the portable default, resolved when used

    report = _sh(["multiclip-report", "run"], cwd=work, env=env)
    assert "held-out metrics of run" in report.stdout and "retrieval" in report.stdout, report.stdout

    missing_config = subprocess.run(["multiclip-train", "--config", "no_such_config"], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=300)
    assert missing_config.returncode == 2
    assert "config file not found: no_such_config" in missing_config.stderr
    assert str(site / "configs" / "no_such_config.yaml") in missing_config.stderr  # every path tried
    assert "retrieval_tiny" in missing_config.stderr  # and the shipped names
