"""Training throughput and peak memory: multiclip's DeepSpeed trainer vs open_clip's own trainer.

    python benchmarks/train_throughput.py --steps 150 --batch-size 64 --rounds 2

Both train the same tiny model (configs/models/tiny-vit.json) from scratch on the same synthetic
WebDataset shards (our shards carry a ``txt`` member, which open_clip_train reads), one process each,
same batch size, fp32, alternating runs. Throughput is the median steady-state samples/s over the
logging windows after the first; peak memory is the peak RSS of the process tree. The data loader
alone is also measured (samples/s it can deliver with the trainer's mapping).

open_clip_train needs ``webdataset<=0.2.86`` (1.0.2 breaks it), so it runs from its own virtual
environment (``--openclip-python``; made by ``make bench-venv``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
OPENCLIP_LAUNCH = """
import sys
import training  # torchvision compatibility on a CPU torch
import open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def peak_rss_of(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc``; return (exit code, peak RSS of its process tree in MiB)."""
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    return proc.returncode, peak / 2**20


def multiclip_config(shards: Path, run: Path, steps: int, batch: int) -> dict:
    return {
        "run": {"output_dir": str(run)},
        "model": {"name": "tiny-vit", "model_config_dir": str(ROOT / "configs" / "models")},
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "num_workers": 1,
                 "shuffle_buffer": 1000},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": batch, "max_steps": steps, "lr_backbone": 1e-3, "lr_head": 1e-3,
                  "warmup_steps": 10},
        "deepspeed": {"precision": "fp32"},
        "schedule": {"log_every": 10},
        "eval": {"max_samples": batch, "batch_size": batch},
    }


def run_multiclip(shards: Path, work: Path, steps: int, batch: int) -> dict:
    run = work / f"mc-{time.time_ns()}"
    config = multiclip_config(shards, run, steps, batch)
    path = work / "mc.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.time()
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_tail = []
    threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True).start()
    code, peak = peak_rss_of(proc)
    if code != 0:
        raise RuntimeError("multiclip run failed:\n" + "".join(stderr_tail[-30:]))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:]
    return {"samples_per_s": statistics.median(rates), "peak_rss_mib": peak, "wall_s": time.time() - start}


def run_open_clip(python: str, shards: Path, work: Path, steps: int, batch: int) -> dict:
    n_train = json.loads((shards / "train" / "sizes.json").read_text())["total"]
    n_shards = len(list((shards / "train").glob("shard-*.tar")))
    pattern = str(shards / "train" / f"shard-{{000000..{n_shards - 1:06d}}}.tar")
    args = ["--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples",
            str(min(n_train, steps * batch)), "--batch-size", str(batch), "--workers", "1", "--model", "tiny-vit",
            "--epochs", "1", "--lr", "1e-3", "--warmup", "10", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98",
            "--eps", "1e-6", "--grad-clip-norm", "1.0", "--precision", "fp32", "--save-frequency", "0",
            "--val-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "", "--log-every-n-steps", "10",
            "--logs", str(work / f"oc-{time.time_ns()}"), "--seed", "0"]
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([python, "-c", OPENCLIP_LAUNCH, str(ROOT / "configs" / "models"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    code, peak = peak_rss_of(proc)
    time.sleep(0.2)
    text = "".join(output)
    if code != 0:
        raise RuntimeError("open_clip_train failed:\n" + text[-3000:])
    # "Batch (t): <avg seconds per batch over the window>"
    windows = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+)", text)][1:]
    return {"samples_per_s": statistics.median(batch / w for w in windows), "peak_rss_mib": peak,
            "wall_s": time.time() - start}


def loader_rate(config: dict, workers: int, batches: int) -> float:
    """Samples/s the shard reader delivers with the retrieval task's mapping (decode, augment, tokenize)."""
    import torch

    import training  # noqa: F401
    from training.validation import config_from_dict
    from training.data import train_loader
    from training.distributed import DistInfo
    from training.model import build_model

    cfg = config_from_dict({**config, "data": {**config["data"], "num_workers": workers}})
    model, backbone = build_model(cfg)
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    stream = iter(train_loader(cfg, model.heads["retrieval"], backbone, info, Path(tempfile.mkdtemp()), 0))
    next(stream)  # start-up (worker fork, first shard) is not throughput
    start = time.time()
    for _ in range(batches):
        next(stream)
    return batches * cfg.optim.micro_batch_size / (time.time() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--openclip-python", default=str(ROOT / ".cache" / "bench" / "openclip-venv" / "bin" / "python"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "train_throughput.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mc-bench-"))
    shards = work / "shards"
    from shards.synth import generate

    generate(shards, task="retrieval", n_train=args.steps * args.batch_size + 2 * args.batch_size, n_val=256,
             seed=0, shard_size=500, image_size=64)
    results = {"multiclip": [], "open_clip_train": []}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both alike
        results["multiclip"].append(run_multiclip(shards, work, args.steps, args.batch_size))
        results["open_clip_train"].append(run_open_clip(args.openclip_python, shards, work, args.steps,
                                                        args.batch_size))
    summary = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    trainer_rate = summary["multiclip"]["samples_per_s"]
    summary["ratio_samples_per_s"] = trainer_rate / summary["open_clip_train"]["samples_per_s"]
    summary["ratio_peak_rss"] = summary["multiclip"]["peak_rss_mib"] / summary["open_clip_train"]["peak_rss_mib"]
    for workers in (1, 2):
        rate = loader_rate(multiclip_config(shards, work / "loader", args.steps, args.batch_size), workers, 60)
        summary[f"loader_samples_per_s_workers{workers}"] = rate
        summary[f"loader_over_trainer_workers{workers}"] = rate / trainer_rate
    summary["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
                           "model": "tiny-vit", "precision": "fp32", "processes": 1, "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
