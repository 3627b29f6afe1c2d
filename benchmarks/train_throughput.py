"""Training throughput and peak memory: multiclip's DeepSpeed trainer vs open_clip's own trainer.

    python benchmarks/train_throughput.py --steps 150 --batch-size 64 --rounds 2

Both train the same tiny model (configs/models/tiny-vit.json) from scratch on the same synthetic
WebDataset shards (our shards carry a ``txt`` member, which open_clip_train reads), one process each,
same batch size, fp32, alternating runs. Throughput is the median steady-state samples/s over the
logging windows after the first; peak memory is the peak RSS of the process tree. The data loader
alone is also measured (samples/s it can deliver with the trainer's mapping).

open_clip_train needs ``webdataset<=0.2.86`` (1.0.2 breaks it), so it runs from its own virtual
environment (``--openclip-python``; made by ``make bench-venv``).

The real regime (issue #19):

    python benchmarks/train_throughput.py --regime vit-b-32 --steps 8 --batch-size 32 --rounds 2

ViT-B-32 (random init) at 224 px from photo-like 400x300 JPEG shards written once into ``--cache``
(``benchmarks/loader_throughput.py``'s generator), one process each, and per trainer every variant of its
documented speed settings named in ``--variants`` (precision fp32 | bf16 autocast, torch.compile on | off;
multiclip also fused AdamW on | off, and always ``uint8_images`` and JPEG draft decoding, its documented
loader settings). Every
round runs each variant once, in the same order, so drift in machine load hits all alike. Reported: each
variant's median samples/s and peak RSS over rounds, each trainer's fastest variant, and the ratio
fastest multiclip / fastest open_clip_train (plus per round, to show the noise).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


def peak_memory_of(proc: subprocess.Popen) -> tuple[int, float, float]:
    """Wait for ``proc``; return (exit code, peak RSS, peak PSS of its process tree, both in MiB).

    RSS counts a page shared by the trainer and its forked loader worker (copy-on-write: the model's
    weights, the imported libraries) once per process; PSS splits it between them, so the tree's PSS
    is the memory the job really holds. RSS is sampled every 0.1 s, PSS (a walk of every mapping, which
    took ~40 % of a core at 0.1 s while the trainer ran) every 0.5 s."""
    peak_rss = peak_pss = 0
    root = psutil.Process(proc.pid)
    tick = 0
    while proc.poll() is None:
        try:
            tree = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
            if tick % 5 == 0:
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        tick += 1
        time.sleep(0.1)
    return proc.returncode, peak_rss / 2**20, peak_pss / 2**20


def multiclip_config(shards: Path, run: Path, steps: int, batch: int, variant: dict | None = None) -> dict:
    if variant is not None:
        return vit_multiclip_config(shards, run, steps, batch, variant)
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


def run_multiclip(shards: Path, work: Path, steps: int, batch: int, variant: dict | None = None) -> dict:
    run = work / f"mc-{time.time_ns()}"
    config = multiclip_config(shards, run, steps, batch, variant)
    path = work / "mc.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.time()
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(path)], cwd=ROOT, env=bench_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_tail = []
    threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True).start()
    code, peak, pss = peak_memory_of(proc)
    if code != 0:
        raise RuntimeError("multiclip run failed:\n" + "".join(stderr_tail[-30:]))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(run)  # checkpoints (GBs at ViT-B-32): only the log is read
    rates = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:]
    return {"samples_per_s": statistics.median(rates), "peak_rss_mib": peak, "peak_pss_mib": pss,
            "wall_s": time.time() - start}


def run_open_clip(python: str, shards: Path, work: Path, steps: int, batch: int, variant: dict | None = None) -> dict:
    train = shards / "train" if variant is None else shards
    n_train = json.loads((train / "sizes.json").read_text())["total"]
    n_shards = len(list(train.glob("shard-*.tar")))
    pattern = str(train / f"shard-{{000000..{n_shards - 1:06d}}}.tar")
    model, precision, log_every, warmup = "tiny-vit", "fp32", 10, 10
    if variant is not None:
        model, precision, log_every, warmup = "ViT-B-32", {"fp32": "fp32", "bf16": "amp_bf16"}[variant["precision"]], \
            VIT_LOG_EVERY, 2
    args = ["--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples",
            str(min(n_train, steps * batch)), "--batch-size", str(batch), "--workers", "1", "--model", model,
            "--epochs", "1", "--lr", "1e-3", "--warmup", str(warmup), "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98",
            "--eps", "1e-6", "--grad-clip-norm", "1.0", "--precision", precision, "--save-frequency", "0",
            "--val-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "", "--log-every-n-steps", str(log_every),
            "--logs", str(logs := work / f"oc-{time.time_ns()}"), "--seed", "0",
            *(["--torchcompile"] if variant is not None and variant["compile"] else [])]
    start = time.time()
    env = {**bench_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([python, "-c", OPENCLIP_LAUNCH, str(ROOT / "configs" / "models"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    code, peak, pss = peak_memory_of(proc)
    time.sleep(0.2)
    shutil.rmtree(logs, ignore_errors=True)  # it saves the final model even with --save-frequency 0
    text = "".join(output)
    if code != 0:
        raise RuntimeError("open_clip_train failed:\n" + text[-3000:])
    # "Batch (t): <avg seconds per batch over the window>"
    windows = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+)", text)][1:]
    return {"samples_per_s": statistics.median(batch / w for w in windows), "peak_rss_mib": peak,
            "peak_pss_mib": pss, "wall_s": time.time() - start}


# --------------------------------------------------------------------------- the real regime: ViT-B-32 at 224 px

VIT_LOG_EVERY = 2  # steps per logging window (both trainers); the first window (start-up, compile) is dropped
VIT_VARIANTS = ("multiclip:fp32", "multiclip:bf16", "multiclip:fp32+compile", "multiclip:bf16+compile",
                "open_clip_train:fp32", "open_clip_train:bf16", "open_clip_train:fp32+compile",
                "open_clip_train:bf16+compile")


def bench_env() -> dict[str, str]:
    """The environment of every trainer run: one inductor cache for all (compile-time is not throughput;
    the first window is dropped anyway), DeepSpeed extensions cached like the tests."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "torchinductor"),
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def parse_variant(text: str) -> dict:
    """``trainer:precision[+compile][+fused]``, e.g. ``multiclip:bf16+compile``; ``fused`` (torch's fused
    AdamW, ``optim.fused``) is a multiclip setting: open_clip_train has no option for it."""
    trainer, _, rest = text.partition(":")
    precision, *flags = rest.split("+")
    allowed = {"compile", "fused"} if trainer == "multiclip" else {"compile"}
    if (trainer not in ("multiclip", "open_clip_train") or precision not in ("fp32", "bf16")
            or not set(flags) <= allowed or len(set(flags)) != len(flags)):
        raise SystemExit(f"--variants: {text!r} is not trainer:precision[+compile][+fused] "
                         "(trainer multiclip|open_clip_train, precision fp32|bf16, +fused for multiclip only)")
    return {"name": text, "trainer": trainer, "precision": precision, "compile": "compile" in flags,
            "fused": "fused" in flags}


def vit_multiclip_config(shards: Path, run: Path, steps: int, batch: int, variant: dict) -> dict:
    """ViT-B-32 with multiclip's documented speed settings: uint8 batches, JPEG draft decoding, 1 worker."""
    return {
        "run": {"output_dir": str(run)},
        "model": {"name": "ViT-B-32", "compile": variant["compile"]},
        "data": {"train": str(shards), "val": str(shards), "num_workers": 1, "shuffle_buffer": 256,
                 "uint8_images": True, "jpeg_draft": True},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": batch, "max_steps": steps, "lr_backbone": 1e-3, "lr_head": 1e-3,
                  "warmup_steps": 2, "fused": variant["fused"]},
        "deepspeed": {"precision": variant["precision"]},
        "schedule": {"log_every": VIT_LOG_EVERY},
        "log": {"tensorboard": False},
        "eval": {"max_samples": 16, "batch_size": 16},
    }


def vit_shards(cache: Path, samples: int) -> Path:
    """400x300 photo-like JPEG retrieval shards (``txt`` + ``json`` captions), written once per size."""
    out = cache / f"jpeg-400x300-{samples}"
    if not (out / "sizes.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from loader_throughput import write_shards

        write_shards(out, 400, 300, samples, shard_size=max(1, samples // 8), distinct=min(samples, 256))
    return out


def run_vit_regime(args) -> dict:
    variants = [parse_variant(v) for v in args.variants.split(",")]
    shards = vit_shards(Path(args.cache), (args.steps + 2) * args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="mc-bench-vit-"))
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for round_ in range(args.rounds):
        for v in variants:
            if v["trainer"] == "multiclip":
                result = run_multiclip(shards, work, args.steps, args.batch_size, v)
            else:
                result = run_open_clip(args.openclip_python, shards, work, args.steps, args.batch_size, v)
            result["round"], result["load_avg_1min"] = round_, os.getloadavg()[0]
            runs[v["name"]].append(result)
            print(json.dumps({v["name"]: result}), flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "peak_rss_mib", "peak_pss_mib", "wall_s")}
               for name, rs in runs.items()}
    best = {}
    for trainer in ("multiclip", "open_clip_train"):
        names = [v["name"] for v in variants if v["trainer"] == trainer]
        if names:
            best[trainer] = max(names, key=lambda n: summary[n]["samples_per_s"])
    if len(best) == 2:
        mc, oc = best["multiclip"], best["open_clip_train"]
        summary["fastest"] = best
        summary["ratio_samples_per_s"] = summary[mc]["samples_per_s"] / summary[oc]["samples_per_s"]
        summary["ratio_peak_rss"] = summary[mc]["peak_rss_mib"] / summary[oc]["peak_rss_mib"]
        summary["ratio_peak_pss"] = summary[mc]["peak_pss_mib"] / summary[oc]["peak_pss_mib"]
        summary["ratio_samples_per_s_per_round"] = [a["samples_per_s"] / b["samples_per_s"]
                                                    for a, b in zip(runs[mc], runs[oc])]
    summary["settings"] = {"regime": "vit-b-32", "steps": args.steps, "batch_size": args.batch_size,
                           "rounds": args.rounds, "model": "ViT-B-32 (random init)", "image": "224 px from 400x300 JPEG",
                           "log_every": VIT_LOG_EVERY, "processes": 1, "cpus": os.cpu_count(),
                           "load": "load_avg_1min per run, read when the run ended"}
    return {"summary": summary, "runs": runs}


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
    parser.add_argument("--out", default=None, help="default runs/bench/train_throughput[_vit-b-32].json")
    parser.add_argument("--regime", choices=("tiny", "vit-b-32"), default="tiny")
    parser.add_argument("--variants", default=",".join(VIT_VARIANTS), help="vit-b-32 regime: trainer:precision[+compile][+fused],...")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench"), help="vit-b-32 regime: JPEG shard cache")
    args = parser.parse_args()
    if args.regime == "vit-b-32":
        result = run_vit_regime(args)
        out = Path(args.out or ROOT / "runs" / "bench" / "train_throughput_vit-b-32.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=1))
        return 0
    args.out = args.out or str(ROOT / "runs" / "bench" / "train_throughput.json")
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
    summary["ratio_peak_pss"] = summary["multiclip"]["peak_pss_mib"] / summary["open_clip_train"]["peak_pss_mib"]
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
