"""GPU figures for docs/benchmarks.md, measured in one device call by benchmarks/gpu_check.sh.

    python benchmarks/gpu_bench.py --out OUT              # on a GPU node: ViT-B-32, 224 px, bf16
    python benchmarks/gpu_bench.py --out OUT --dry-run    # on CPU: the same steps on tiny-vit, a few steps

1. Fine-tuning throughput through the real trainer (``deepspeed --num_gpus 1 launch/train.py``) on
   realistic JPEG shards (500x375, quality 90): samples/s/GPU (median over logging windows after the
   first), peak memory, achieved TFLOP/s (FLOPs of one training step counted by torch's FlopCounterMode,
   times samples/s) and GPU utilisation (nvidia-smi sampled every 0.5 s while training runs).
2. torch's ViT-B-32 image tower in bf16 (inference), images/s.
Writes gpu_bench.json, train_log.jsonl and train_output.txt into OUT.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_jpeg_shards(out: Path, count: int, shard_size: int, seed: int = 0) -> None:
    """Photo-like 500x375 JPEGs (smooth colour fields, edges and noise), quality 90, with captions."""
    from PIL import Image, ImageDraw

    from shards.writer import ShardSetWriter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    with ShardSetWriter(out, shard_size=shard_size, overwrite=True) as writer:
        for i in range(count):
            base = rng.uniform(0, 255, 3)[None, None] * (0.5 + 0.5 * np.sin(xx / rng.uniform(20, 90))[..., None])
            pixels = np.clip(base + rng.normal(0, 12, (375, 500, 3)) + (yy / 375 * 60)[..., None], 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y = rng.integers(0, 400), rng.integers(0, 300)
                draw.ellipse([x, y, x + rng.integers(30, 100), y + rng.integers(30, 100)],
                             fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            writer.write(f"{i:07d}", {"jpg": buffer.getvalue()}, {"caption": f"a photo of object {i % 100}",
                                                                   "label": f"object {i % 100}"})


class GpuSampler:
    """nvidia-smi utilisation samples in a thread (empty on a machine without it)."""

    def __init__(self, period_s: float = 0.5):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s: float) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            time.sleep(period_s)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def train_config(shards: Path, run: Path, model: str, steps: int, batch: int, workers: int | str) -> dict:
    return {
        "run": {"output_dir": str(run), "seed": 0},
        "model": {"name": model, "model_config_dir": str(ROOT / "configs" / "models")},
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "num_workers": workers,
                 "shuffle_buffer": 1000, "resample": True},
        "tasks": [{"name": "retrieval"}],
        "optim": {"micro_batch_size": batch, "max_steps": steps, "lr_backbone": 1e-5, "lr_head": 1e-3,
                  "warmup_steps": 5},
        "deepspeed": {"zero_stage": 0, "precision": "auto"},
        "schedule": {"log_every": 10},
        "eval": {"batch_size": 256, "max_samples": 256},
    }


def flops_per_sample(model_name: str, device: str, image_size: int) -> float:
    """FLOPs of one training step (forward + backward of both towers and the loss) per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import training  # noqa: F401
    from training.config import ModelConfig
    from training.losses import symmetric_infonce
    from training.backbone import create_backbone

    backbone = create_backbone(ModelConfig(name=model_name, model_config_dir=str(ROOT / "configs" / "models")))
    model = backbone.model.to(device)
    batch = 8
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    text = backbone.tokenizer([f"a photo of object {i}" for i in range(batch)]).to(device)
    with FlopCounterMode(display=False) as counter:
        out = model(image=images, text=text)
        loss = symmetric_infonce(out["image_features"], out["text_features"], torch.arange(batch, device=device),
                                 torch.tensor(100.0, device=device))
        loss.backward()
    return counter.get_total_flops() / batch


def image_tower_throughput(model_name: str, device: str, image_size: int, batch: int, seconds: float) -> float:
    """Images/s of the bf16 image tower (inference), after warm-up."""
    import torch

    import training  # noqa: F401
    from training.config import ModelConfig
    from training.backbone import create_backbone

    visual = create_backbone(ModelConfig(name=model_name, model_config_dir=str(ROOT / "configs" / "models"))
                             ).model.visual.to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        for _ in range(3):
            visual(x)
        sync()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            visual(x)
            n += batch
        sync()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny-vit on CPU, a few steps: checks the script")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=256, help="micro batch per GPU")
    parser.add_argument("--samples", type=int, default=6000, help="JPEGs written for the training shards")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_BENCH_WORK", "/tmp/multiclip_gpu_bench"))
    if args.dry_run:
        model, image_size, steps, batch, samples, device = "tiny-vit", 64, 3, 8, 96, "cpu"
    else:
        model, image_size, steps, batch, samples, device = "ViT-B-32", 224, args.steps, args.batch, args.samples, "cuda"
    result: dict = {"dry_run": args.dry_run, "model": model, "image_size": image_size, "micro_batch": batch}

    shards = work / "shards"
    write_jpeg_shards(shards / "train", samples, shard_size=max(1, samples // 32))
    write_jpeg_shards(shards / "val", 256 if not args.dry_run else 16, shard_size=256, seed=1)

    import yaml

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(train_config(shards, run, model, steps, batch, "auto")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.dry_run:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "launch/train.py", "--config", str(config)]
    if shutil.which(cmd[0]) is None:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
    started = time.time()
    with GpuSampler() as sampler, (out / "train_output.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1200)
    result["train_wall_s"] = round(time.time() - started, 1)
    result["train_rc"] = proc.returncode
    if (run / "log.jsonl").is_file():
        shutil.copy(run / "log.jsonl", out / "train_log.jsonl")
    if proc.returncode == 0:
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        windows = [r for r in records if r["kind"] == "train"][1:] or [r for r in records if r["kind"] == "train"]
        rate = statistics.median(r["samples_per_s"] for r in windows)
        result["train_samples_per_s_per_gpu"] = round(rate, 1)
        peaks = [r["peak_memory_gib"] for r in windows if r.get("peak_memory_gib") is not None]
        result["train_peak_memory_gib"] = round(max(peaks), 2) if peaks else None  # GPU only
        result["gpu_utilisation_pct"] = {"mean": round(statistics.mean(sampler.samples), 1),
                                         "samples": len(sampler.samples)} if sampler.samples else None
        flops = flops_per_sample(model, device, image_size)
        result["train_flops_per_sample"] = flops
        result["train_achieved_tflops"] = round(flops * rate / 1e12, 2)
    result["image_tower_bf16_images_per_s"] = round(
        image_tower_throughput(model, device, image_size, 64 if args.dry_run else 1024, 2 if args.dry_run else 10), 1)
    import torch

    result["torch"] = torch.__version__
    result["device_name"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
