"""Loader throughput at real resolution: multiclip's train loader vs open_clip_train's webdataset pipeline.

    python benchmarks/loader_throughput.py --rounds 3
    python benchmarks/loader_throughput.py --sizes 500x375,1024x768 --rounds 3   # + a larger source size

Writes shard sets of photo-like JPEGs (smooth gradients, noise, hard-edged shapes; quality 90) with a
caption (``txt`` and ``json``) per sample, then measures the samples/s one DataLoader worker delivers
(per worker core) with the 224-px ViT-B-32 training transform (RandomResizedCrop(224, scale=(0.9, 1)),
bicubic, OpenAI mean/std) and its tokenizer, for

* ``multiclip``: ``training.data.train_loader`` (retrieval task mapping), JPEG draft decoding on
  (``jpeg_draft``), fp32 images;
* ``multiclip_no_draft``: the same with ``jpeg_draft: false`` (the share of draft decoding);
* ``multiclip_uint8``: draft decoding and ``uint8_images: true`` (ToTensor + Normalize move to the
  device; on this CPU-only run the conversion is not counted, as it would run on the GPU);
* ``open_clip_train``: ``open_clip_train.data.get_wds_dataset`` itself on the same shards, from its own
  virtual environment (it needs ``webdataset<=0.2.86``; ``make bench-venv``).

Rounds interleave the loaders (a, b, a', b, a'', b ...: each multiclip variant is paired with the
open_clip_train measurement right after it) so drift in machine load hits all alike; one unrecorded
warm-up measurement of each comes first. Each measurement builds a fresh loader, takes one batch (start-up: worker fork, shuffle-buffer fill) and then times
``--batches`` batches. Reported per loader: samples/s (wall) and samples per CPU-second of the worker
process; ratios multiclip / open_clip_train per round, with min and median.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: F401,E402  (torchvision compatibility before open_clip)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ViT-B-32"

# runs in the open_clip_train venv: one JSON request per stdin line, one JSON result per stdout line
OPENCLIP_SERVER = r"""
import argparse, json, os, sys, time
import training  # torchvision compatibility on a CPU torch
import open_clip
from open_clip_train.data import get_wds_dataset

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children():
    found = set()
    for stat in os.listdir("/proc"):
        try:
            if stat.isdigit() and int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(stat))
        except (OSError, ValueError):
            pass
    return found


cache = {}
for line in sys.stdin:
    req = json.loads(line)
    if req["model"] not in cache:
        _, preprocess_train, _ = open_clip.create_model_and_transforms(req["model"])
        cache[req["model"]] = (preprocess_train, open_clip.get_tokenizer(req["model"]))
    preprocess_train, tokenizer = cache[req["model"]]
    args = argparse.Namespace(train_data=req["pattern"], val_data=None, dataset_resampled=False,
                              train_num_samples=req["samples"], train_data_upsampling_factors=None,
                              batch_size=req["batch"], workers=1, world_size=1, rank=0, seed=0)
    loader = get_wds_dataset(args, preprocess_train, is_train=True, epoch=0, tokenizer=tokenizer).dataloader
    before = children()
    it = iter(loader)
    next(it)
    (worker,) = children() - before
    cpu0, t0, n = cpu_seconds(worker), time.perf_counter(), 0
    for _ in range(req["batches"]):
        images, _ = next(it)
        n += len(images)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(worker) - cpu0
    del it, loader
    print(json.dumps({"samples": n, "seconds": seconds, "worker_cpu_s": cpu, "transform": repr(preprocess_train)}),
          flush=True)
"""


# --------------------------------------------------------------------------- data


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (quality 90): colour gradients, sensor-like noise, textured and flat shapes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)
    base = rng.uniform(30, 200, 3)
    img = base + ramp[..., None] * rng.uniform(-120, 120, 3)
    img += 25 * np.sin(x / rng.uniform(15, 60) + y / rng.uniform(15, 60))[..., None]
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.03, 0.25) * width, rng.uniform(0.03, 0.25) * height
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        texture = rng.normal(0, rng.uniform(0, 25), (height, width, 1)) if rng.random() < 0.5 else 0
        img = np.where(inside[..., None], rng.uniform(0, 255, 3) + texture, img)
    img += rng.normal(0, 6, img.shape)
    buffer = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shards(out: Path, width: int, height: int, samples: int, shard_size: int, distinct: int) -> dict:
    """``samples`` retrieval samples (``distinct`` different images, cycled) in shards of ``shard_size``."""
    from shards.writer import ShardSetWriter

    images = [photo(width, height, seed) for seed in range(distinct)]
    colours, things = ("red", "green", "blue", "grey", "golden"), ("boats", "houses", "trees", "people", "cars")
    with ShardSetWriter(out, shard_size=shard_size, overwrite=True) as writer:
        for i in range(samples):
            caption = (f"a photo of {i % 7 + 2} {colours[i % 5]} {things[i // 5 % 5]} near the water "
                       f"on a bright afternoon, picture {i}")
            writer.write(f"s{i:06d}", {"jpg": images[i % distinct]}, {"caption": caption, "label": caption})
    n_shards = len(list(out.glob("shard-*.tar")))
    return {"dir": str(out), "pattern": str(out / f"shard-{{000000..{n_shards - 1:06d}}}.tar"),
            "samples": samples, "shards": n_shards, "mean_jpeg_bytes": sum(map(len, images)) / len(images)}


# --------------------------------------------------------------------------- the loaders


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; the same helper runs in the server)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids() -> set[int]:
    """Live child processes of this one (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


class MulticlipLoaders:
    """multiclip's train loader (retrieval mapping) on one shard directory, in this process."""

    def __init__(self, batch: int):
        from training.config import ModelConfig
        from training.backbone import create_backbone
        from training.registry import get_task_class

        self.batch = batch
        self.backbone = create_backbone(ModelConfig(name=MODEL))
        task_class = get_task_class("retrieval")
        self.task = task_class(task_class.Options(), self.backbone)
        self.run_dir = Path(tempfile.mkdtemp(prefix="mc-loader-bench-"))

    def measure(self, shard_dir: str, batches: int, **data) -> dict:
        import torch

        from training.validation import config_from_dict
        from training.data import train_loader
        from training.distributed import DistInfo

        raw = {"run": {"output_dir": str(self.run_dir)}, "model": {"name": MODEL},
               "data": {"train": shard_dir, "val": shard_dir, "num_workers": 1, "shuffle_buffer": 1000, **data},
               "tasks": [{"name": "retrieval"}], "optim": {"micro_batch_size": self.batch}}
        cfg = config_from_dict(raw)
        loader = train_loader(cfg, self.task, self.backbone, DistInfo(0, 1, 0, 1, torch.device("cpu")), self.run_dir, 0)
        before = child_pids()
        it = iter(loader)
        next(it)  # start-up: worker fork, first shard, shuffle-buffer fill
        (worker,) = child_pids() - before  # the one DataLoader worker
        cpu0, t0, n = cpu_seconds(worker), time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(it)["image"])
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(worker) - cpu0
        del it, loader
        return {"samples": n, "seconds": seconds, "worker_cpu_s": cpu}


class OpenClipServer:
    """open_clip_train's get_wds_dataset in its own venv, measuring on request."""

    def __init__(self, python: str):
        if not Path(python).exists():
            raise SystemExit(f"{python} not found: run `make bench-venv` first (open_clip_train needs webdataset<=0.2.86)")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([python, "-c", OPENCLIP_SERVER], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def measure(self, shard_set: dict, batch: int, batches: int) -> dict:
        request = {"pattern": shard_set["pattern"], "samples": shard_set["samples"], "batch": batch,
                   "batches": batches, "model": MODEL}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"open_clip_train server exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def rates(result: dict) -> dict:
    return {"samples_per_s": result["samples"] / result["seconds"],
            "samples_per_worker_cpu_s": result["samples"] / max(result["worker_cpu_s"], 1e-9)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for name, results in runs.items():
        per = [rates(r) for r in results]
        out[name] = {k: {"median": statistics.median(p[k] for p in per), "min": min(p[k] for p in per),
                         "max": max(p[k] for p in per)} for k in per[0]}
    base = [rates(r) for r in runs["open_clip_train"]]
    for name in runs:
        if name == "open_clip_train":
            continue
        for key in ("samples_per_s", "samples_per_worker_cpu_s"):
            ratios = [rates(a)[key] / b[key] for a, b in zip(runs[name], base)]
            out[f"ratio_{name}_over_open_clip_train"] = out.get(f"ratio_{name}_over_open_clip_train", {})
            out[f"ratio_{name}_over_open_clip_train"][key] = {
                "per_round": [round(r, 3) for r in ratios], "min": min(ratios), "median": statistics.median(ratios)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500x375", help="comma-separated WIDTHxHEIGHT source sizes")
    parser.add_argument("--samples", type=int, default=2000, help="samples per shard set")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--distinct", type=int, default=100, help="different images per set (cycled)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round (after one start-up batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="multiclip,multiclip_no_draft,multiclip_uint8")
    parser.add_argument("--openclip-python", default=str(ROOT / ".cache" / "bench" / "openclip-venv" / "bin" / "python"))
    parser.add_argument("--work", default=None, help="folder for the shards (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "loader_throughput.json"))
    args = parser.parse_args()
    if (args.batches + 1) * args.batch_size > args.samples:
        raise SystemExit("--samples must cover (--batches + 1) x --batch-size")
    work = Path(args.work or tempfile.mkdtemp(prefix="mc-loader-bench-"))
    variants = {"multiclip": {"jpeg_draft": True}, "multiclip_no_draft": {"jpeg_draft": False},
                "multiclip_uint8": {"jpeg_draft": True, "uint8_images": True}}
    chosen = [v for v in args.variants.split(",") if v]

    sets = {}
    for size in args.sizes.split(","):
        width, height = map(int, size.lower().split("x"))
        start = time.time()
        sets[size] = write_shards(work / size, width, height, args.samples, args.shard_size, args.distinct)
        print(f"wrote {size}: {sets[size]['shards']} shards, {sets[size]['mean_jpeg_bytes'] / 1024:.0f} KiB per JPEG "
              f"({time.time() - start:.0f}s)", file=sys.stderr)

    ours = MulticlipLoaders(args.batch_size)
    server = OpenClipServer(args.openclip_python)
    results: dict = {}
    transform_check = None
    try:
        for size, shard_set in sets.items():
            for name in chosen:  # warm-up, not recorded: first-use costs in both processes
                ours.measure(shard_set["dir"], 1, **variants[name])
            server.measure(shard_set, args.batch_size, 1)
            runs = {name: [] for name in [*chosen, "open_clip_train"]}
            for round_ in range(args.rounds):  # interleaved: a, b, a, b ...
                for name in chosen:
                    runs[name].append(ours.measure(shard_set["dir"], args.batches, **variants[name]))
                    other = server.measure(shard_set, args.batch_size, args.batches)
                    transform_check = other.pop("transform")
                    runs["open_clip_train"].append(other)
                    print(f"{size} round {round_}: {name} {rates(runs[name][-1])['samples_per_s']:.0f}/s, "
                          f"open_clip_train {rates(other)['samples_per_s']:.0f}/s", file=sys.stderr)
            # each multiclip variant is paired with the open_clip_train measurement taken right after it
            paired = {name: runs[name] for name in chosen}
            summary = {}
            for name in chosen:
                base = runs["open_clip_train"][chosen.index(name)::len(chosen)]
                summary.update({k: v for k, v in summarise({name: paired[name], "open_clip_train": base}).items()
                                if k != "open_clip_train"})
            summary["open_clip_train"] = summarise({"open_clip_train": runs["open_clip_train"]})["open_clip_train"]
            results[size] = {"summary": summary, "runs": runs, "shards": shard_set}
    finally:
        server.close()

    ours_transform = repr(ours.backbone.preprocess_train)
    settings = {"model": MODEL, "transform": ours_transform, "same_transform_as_open_clip_train": ours_transform == transform_check,
                "batch_size": args.batch_size, "timed_batches": args.batches, "rounds": args.rounds, "workers": 1,
                "shuffle_buffer": 1000, "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                "loadavg_end": os.getloadavg(), "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print(json.dumps({"settings": settings, **{size: r["summary"] for size, r in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
