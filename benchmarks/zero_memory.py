"""Peak memory per rank with ZeRO 0, 2 and 3 at ViT-B-32 scale, and the largest micro batch each fits.

    python benchmarks/zero_memory.py --budget-gib 4 --stages 0,2,3

Each measurement is a real 2-rank job: ``deepspeed --num_gpus 2 launch/train.py`` (gloo on DeepSpeed's
CPU accelerator, ``OMP_NUM_THREADS=1`` per rank), the retrieval task on ViT-B-32 (random init: no
weights can be downloaded) at 224 px, fp32, AdamW (torch's, as the trainer always passes it), from
photo-like JPEG shards written once into ``--cache`` (``benchmarks/loader_throughput.py``'s generator).

Memory is the RSS of each rank process (its DataLoader worker is a separate process and not counted),
sampled every 0.2 s with psutil. "Training peak" is the peak until the last step's log record; after it,
rank 0 writes the final weights, reported apart as "job peak": for ZeRO 0-2 from its live module (since
session 10), for ZeRO 3 by consolidating the checkpoint (DeepSpeed's reader of every rank's files).

Then, per stage, the largest micro batch whose training peak stays within ``--budget-gib`` on both ranks:
doubling from ``--start-batch`` until a batch does not fit, then ``--bisect`` bisection steps between the
last fit and the first miss (``--search-steps`` optimizer steps per try). A batch "fits" when its measured
peak is within the budget; nothing is killed at the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
RANK_ARG = re.compile(r"--local_rank=(\d+)")


def ensure_shards(cache: Path, width: int, height: int, samples: int) -> Path:
    """JPEG retrieval shards (written once; reused when the cache already holds this set)."""
    out = cache / f"jpeg-{width}x{height}-{samples}"
    if not (out / "sizes.json").is_file():
        from loader_throughput import write_shards

        write_shards(out, width, height, samples, shard_size=max(1, samples // 8), distinct=min(samples, 256))
    return out


def job_config(shards: Path, run: Path, stage: int, batch: int, steps: int, ds_config: str | None = None) -> dict:
    return {
        "run": {"output_dir": str(run)},
        "model": {"name": "ViT-B-32"},
        "data": {"train": str(shards), "val": str(shards), "num_workers": 1, "shuffle_buffer": 64},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": batch, "max_steps": steps, "lr_backbone": 1e-4, "lr_head": 1e-3,
                  "warmup_steps": 0},
        "deepspeed": {"zero_stage": stage, "precision": "fp32", "config_file": ds_config},
        "schedule": {"log_every": 1, "keep_checkpoints": 1},
        "log": {"tensorboard": False},
        "eval": {"batch_size": 16, "max_samples": 16},
    }


def rank_processes(root: psutil.Process) -> dict[int, psutil.Process]:
    """The rank processes under the launcher (not their DataLoader workers, which share the command line)."""
    found = {}
    for proc in root.children(recursive=True):
        try:
            match = RANK_ARG.search(" ".join(proc.cmdline()))
            if match and not RANK_ARG.search(" ".join(proc.parent().cmdline())):
                found[int(match.group(1))] = proc
        except psutil.Error:
            continue
    return found


def train_records(run: Path) -> int:
    log = run / "log.jsonl"
    if not log.is_file():
        return 0
    return sum('"kind": "train"' in line for line in log.read_text().splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(shards: Path, work: Path, stage: int, batch: int, steps: int, timeout: float,
            ds_config: str | None = None) -> dict:
    """One 2-rank job; peak RSS per rank during training and over the whole job (MiB)."""
    run = work / f"z{stage}-b{batch}-{time.time_ns()}"
    run.mkdir(parents=True)
    config = run.parent / f"{run.name}.yaml"
    config.write_text(yaml.safe_dump(job_config(shards, run, stage, batch, steps, ds_config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    start = time.time()
    log_path = run.parent / f"{run.name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
                                 "launch/train.py", "--config", str(config)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    train_peak, job_peak, training = {0: 0, 1: 0}, {0: 0, 1: 0}, True
    while proc.poll() is None:
        if time.time() - start > timeout:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"ZeRO {stage}, batch {batch}: over {timeout:.0f} s (log: {log_path})")
        training = training and train_records(run) < steps
        for rank, p in rank_processes(root).items():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            job_peak[rank] = max(job_peak[rank], rss)
            if training:
                train_peak[rank] = max(train_peak[rank], rss)
        time.sleep(0.2)
    if proc.returncode != 0:
        shutil.rmtree(run, ignore_errors=True)
        raise RuntimeError(f"ZeRO {stage}, batch {batch} failed (rc {proc.returncode}):\n"
                           + log_path.read_text()[-3000:])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(run)  # a ViT-B-32 checkpoint is GBs: keep only the job's log next to it
    rates = [r["samples_per_s"] for r in records if r["kind"] == "train"]
    mib = lambda d: {str(k): round(v / 2**20) for k, v in sorted(d.items())}  # noqa: E731
    return {"stage": stage, "micro_batch": batch, "steps": steps, "train_peak_rss_mib": mib(train_peak),
            "job_peak_rss_mib": mib(job_peak), "last_samples_per_s": rates[-1] if rates else None,
            "wall_s": round(time.time() - start, 1)}


def fits(result: dict, budget_mib: float) -> bool:
    return max(result["train_peak_rss_mib"].values()) <= budget_mib


def largest_fitting_batch(shards: Path, work: Path, stage: int, budget_mib: float, start: int, bisect: int,
                          steps: int, timeout: float, tries: list[dict], ds_config: str | None = None) -> int | None:
    """Doubling from ``start``, then bisection, on the measured training peak; every try is appended to
    ``tries``. Returns the largest batch measured to fit (None: not even batch 1)."""
    def attempt(batch: int) -> bool:
        result = measure(shards, work, stage, batch, steps, timeout, ds_config)
        result["fits"] = fits(result, budget_mib)
        tries.append(result)
        print(json.dumps(result), flush=True)
        return result["fits"]

    low, high, batch = 0, None, start
    while high is None:  # double from a fit until a miss
        if attempt(batch):
            low, batch = batch, 2 * batch
        else:
            high = batch
    while low == 0 and high > 1:  # the first try missed: halve until one fits
        if attempt(high // 2):
            low = high // 2
        else:
            high //= 2
    for _ in range(bisect):
        if high - low <= 1:
            break
        mid = (low + high) // 2
        if attempt(mid):
            low = mid
        else:
            high = mid
    return low or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="0,2,3")
    parser.add_argument("--batch", type=int, default=16, help="micro batch of the per-stage measurement")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the per-stage measurement")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget per rank (RSS)")
    parser.add_argument("--start-batch", type=int, default=8)
    parser.add_argument("--bisect", type=int, default=1)
    parser.add_argument("--search-steps", type=int, default=2,
                        help="steps per try: from step 2 on, AdamW's states and the activations coexist")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--search-only", action="store_true", help="skip the per-stage measurement")
    parser.add_argument("--ds-config", default=None,
                        help="a ds_config JSON merged over the generated one (deepspeed.config_file), e.g. smaller "
                             "reduce/allgather buckets")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per job")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "zero_memory.json"))
    args = parser.parse_args()
    started = time.time()
    shards = ensure_shards(Path(args.cache), 400, 300, 512)
    work = Path(tempfile.mkdtemp(prefix="zero-mem-"))
    stages = [int(s) for s in args.stages.split(",")]
    per_stage = []
    for stage in [] if args.search_only else stages:
        result = measure(shards, work, stage, args.batch, args.steps, args.timeout, args.ds_config)
        per_stage.append(result)
        print(json.dumps(result), flush=True)
    search, tries = {}, []
    if not args.no_search:
        for stage in stages:
            search[str(stage)] = largest_fitting_batch(shards, work, stage, args.budget_gib * 1024, args.start_batch,
                                                       args.bisect, args.search_steps, args.timeout, tries,
                                                       ds_config=args.ds_config)
    summary = {"per_stage": per_stage, "largest_micro_batch_in_budget": search, "search_tries": tries,
               "settings": {"model": "ViT-B-32", "image": "224 px from 400x300 JPEGs", "ranks": 2,
                            "backend": "gloo (DeepSpeed CPU accelerator)", "precision": "fp32",
                            "optimizer": "torch AdamW", "budget_gib_per_rank": args.budget_gib,
                            "search": f"doubling from {args.start_batch}, {args.bisect} bisection step(s), "
                                      f"{args.search_steps} step(s) per try",
                            "ds_config": json.loads(Path(args.ds_config).read_text()) if args.ds_config else None,
                            "cpus": os.cpu_count(), "machine": platform.machine(),
                            "total_wall_s": round(time.time() - started, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("per_stage", "largest_micro_batch_in_budget")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
