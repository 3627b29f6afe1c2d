"""Reading one shard set locally vs over a loopback HTTP server vs through ``pipe:cat`` (issue #19).

    python benchmarks/remote_read.py --rounds 3
    python benchmarks/remote_read.py --rounds 5 --shards 8 --per-shard 250 --image-size 320 --json out.json

Writes ``--shards`` shards of photo-like JPEGs (gradients plus noise, quality 90) with a caption, starts
``python -m http.server`` on a free 127.0.0.1 port in its own process (so the server does not share the
reader's interpreter), and measures two things per source, the sources interleaved in every round
(local, http, pipe; then http, pipe, local; ...: each leads a round in turn) so drift in machine load
hits all alike:

* ``loader``: samples/s of ``shards.reader.make_loader`` (one DataLoader worker, shuffle buffer 100,
  batch 32), whose map resizes each decoded image to 64x64 and makes it a uint8 tensor: reading,
  decoding and mapping, what training pays per sample. The first batch (worker start, buffer fill) is
  not timed; then ``--batches`` batches are.
* ``read``: samples/s and MB/s of ``shards.samples.read_shards`` alone (tar members, no decoding), in
  this process: the transport's own cost, the harshest comparison.

Reported: per source the median over rounds, and per round the ratio remote / local, with min and median.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from shards.reader import make_loader  # noqa: E402
from shards.samples import SkipLog, expand_urls, read_shards  # noqa: E402
from shards.writer import ShardSetWriter  # noqa: E402

SOURCES = ("local", "http", "pipe")


def photo_like(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG that compresses like a photo (smooth gradient plus noise), not like a flat test card."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 200, 3) + rng.uniform(0, 50, 3)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_set(folder: Path, shards: int, per_shard: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with ShardSetWriter(folder, shard_size=per_shard) as writer:
        for i in range(shards * per_shard):
            caption = f"a photo number {i}"
            writer.write(f"{i:09d}", {"jpg": photo_like(rng, size)}, {"task": "retrieval", "caption": caption})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` serving ``folder`` on loopback; waits until it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base}/sizes.json", timeout=1).read()
            return server, base
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the loopback HTTP server did not start")


def small_uint8(sample: dict) -> torch.Tensor:
    image = sample["jpg"].resize((64, 64), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def time_loader(spec: str, batches: int, batch_size: int, workers: int) -> float:
    """Samples/s of one fresh loader after its first batch."""
    loader = make_loader(spec, map_fn=small_uint8, batch_size=batch_size, num_workers=workers, seed=0,
                         shuffle_buffer=100, persistent_workers=False)
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    del stream
    return batches * batch_size / seconds


def time_read(spec: str) -> tuple[float, float]:
    """(samples/s, MB/s) of reading every shard's members, without decoding."""
    urls = expand_urls(spec)
    count, size = 0, 0
    start = time.perf_counter()
    for sample in read_shards([{"url": u} for u in urls], SkipLog()):
        count += 1
        size += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    seconds = time.perf_counter() - start
    return count / seconds, size / seconds / 1e6


def machine(load_at_start: float) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {cores} cores, load average {load_at_start:.1f} at start, "
            f"{load:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory(prefix="remote-read-") as tmp:
        folder = Path(tmp) / "train"
        write_set(folder, args.shards, args.per_shard, args.image_size)
        last = f"{args.shards - 1:06d}"
        server, base = start_server(folder)
        try:
            specs = {"local": str(folder), "http": f"{base}/shard-{{000000..{last}}}.tar",
                     "pipe": f"pipe:cat {folder}/shard-{{000000..{last}}}.tar"}
            for source in SOURCES:  # unrecorded warm-up of each (page cache, imports, fsspec's session)
                time_read(specs[source])
            results = {s: {"loader": [], "read": [], "read_mb_s": []} for s in SOURCES}
            for round_ in range(args.rounds):
                for source in SOURCES[round_ % 3:] + SOURCES[:round_ % 3]:  # each source leads a round in turn
                    results[source]["loader"].append(time_loader(specs[source], args.batches, args.batch_size,
                                                                 args.workers))
                    samples_s, mb_s = time_read(specs[source])
                    results[source]["read"].append(samples_s)
                    results[source]["read_mb_s"].append(mb_s)
        finally:
            server.terminate()
            server.wait(10)
        shard_mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e6

    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(load_at_start),
              "set": f"{args.shards} shards x {args.per_shard} JPEGs {args.image_size}px, {shard_mb:.1f} MB",
              "sources": {}, "ratios": {}}
    for source in SOURCES:
        report["sources"][source] = {k: round(statistics.median(v), 1) for k, v in results[source].items()}
    for source in SOURCES[1:]:
        for what in ("loader", "read"):
            ratios = [r / l for r, l in zip(results[source][what], results["local"][what])]
            report["ratios"][f"{source}/local {what}"] = {"min": round(min(ratios), 3),
                                                           "median": round(statistics.median(ratios), 3),
                                                           "rounds": [round(r, 3) for r in ratios]}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
