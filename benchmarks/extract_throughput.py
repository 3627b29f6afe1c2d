"""Feature-extraction throughput: Ray actors on the exported model (onnxruntime int8) and on the torch run,
1 vs 2 actors each, and a plain single-process torch loop; and the start-up of one extraction worker.

    python benchmarks/extract_throughput.py --model ViT-B-32 --images 384 --rounds 1

All three embed the same synthetic shards with the same weights (a randomly initialised open_clip
model written as a run's final/, so the forward costs what a real model costs). Ray actors get one
torch thread each (0.75 CPU each, 0.5 CPU for the read/preprocess tasks: 2 cores in all); the plain
loop (shards.reader's eval loader + the model in one process) uses all cores' threads. Runs alternate
(ray-1, ray-2, plain per round). Reported: images/s over the whole run and after the first embedded
batch (actor start-up and model loading excluded).

Start-up (issue #16: before = torch-run actors, after = onnxruntime actors): seconds from creating one
embedding actor (``serving.extract.Embedder`` as a Ray actor, 0.75 CPU, 1 thread) to its first embedded
batch back in the driver: worker process, imports, model load and one batch of ``--batch-size`` images.
Measured in the same run, alternating backends, ``--startup-rounds`` times each, before the throughput runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from training.extract_torch import KIND  # noqa: E402  (the torch-run backend; imports training first)

ROOT = Path(__file__).resolve().parents[1]


def make_run(model: str, out: Path) -> Path:
    """A run folder whose final/ holds a freshly initialised model (throughput does not depend on training)."""
    from training.checkpoint import write_final
    from training.validation import config_from_dict
    from training.model import build_model

    raw = {"run": {"output_dir": str(out)}, "model": {"name": model, "model_config_dir": str(ROOT / "configs/models")},
           "data": {"train": "unused", "val": "unused"}, "tasks": [{"name": "retrieval"}]}
    cfg = config_from_dict(raw)
    torch_model, _ = build_model(cfg)
    write_final(torch_model.state_dict(), out / "final", cfg.to_dict())
    return out


def ray_run(spec, shards: Path, out: Path, actors: int, batch_size: int) -> dict:
    from serving.extract import ExtractOptions, extract

    options = ExtractOptions(actors=actors, actor_cpus=0.75, threads=1, batch_size=batch_size)
    this = extract(str(shards), out, spec, options)["this_run"]
    steady = this["seconds"] - this["first_batch_seconds"]
    return {"images": this["embedded"], "seconds": this["seconds"], "images_per_s": this["images_per_s"],
            "first_batch_seconds": this["first_batch_seconds"],
            "images_per_s_after_first_batch": round((this["embedded"] - batch_size) / steady, 2)}


class StartupProbe:
    """One embedding actor: builds the backend as the job's actors do, embeds on request."""

    def __init__(self, spec, threads: int):
        from serving.extract import Embedder

        self.embedder = Embedder(spec, threads)

    def embed(self, batch: dict) -> int:
        return len(self.embedder(batch)["key"])


def startup_seconds(spec, batch_size: int) -> float:
    """Seconds from creating an embedding actor to its first embedded batch back in the driver."""
    import numpy as np
    import ray

    size = spec.preprocess_cfg()["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    n = batch_size
    batch = {"shard": np.array(["s"] * n, dtype=object), "key": np.array([str(i) for i in range(n)], dtype=object),
             "valid": np.ones(n, bool), "last": np.zeros(n, bool), "shard_rows": np.zeros(n, np.int64),
             "skipped": np.array([""] * n, dtype=object), "image": np.zeros((n, 3, *size), np.float32)}
    batch_ref = ray.put(batch)  # in the object store first: the clock measures the actor, not the upload
    start = time.perf_counter()
    actor = ray.remote(num_cpus=0.75)(StartupProbe).remote(spec, 1)
    assert ray.get(actor.embed.remote(batch_ref)) == n
    seconds = time.perf_counter() - start
    ray.kill(actor)
    return round(seconds, 2)


def plain_run(run: Path, shards: Path, batch_size: int) -> dict:
    """Reader + model in this process, no Ray: what one machine does without it."""
    import torch

    from serving.extract import EncoderSpec
    from shards.reader import make_eval_loader
    from shards.writer import is_image_member
    from training.extract_torch import eval_transform

    spec = EncoderSpec(KIND, str(run))
    transform = eval_transform(spec.preprocess_cfg())
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    backend = spec.build()

    def to_tensor(sample):
        return transform(next(v for k, v in sample.items() if is_image_member(k)))

    n, first = 0, None
    for batch in make_eval_loader(str(shards), map_fn=to_tensor, batch_size=batch_size):
        backend.encode(batch.numpy())
        n += len(batch)
        first = first or time.perf_counter()
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
            "images_per_s_after_first_batch": round((n - batch_size) / (time.perf_counter() - first), 2)}


def openclip_webdataset_run(run: Path, shards: Path, batch_size: int) -> dict:
    """What a user would write without this project: open_clip's model and transform, a webdataset
    pipeline over the same shards, one process (the run's own open_clip.safetensors weights)."""
    import glob

    import open_clip
    import torch
    import webdataset as wds

    from training.backbone import register_model_configs

    config = json.loads((run / "final" / "config.json").read_text())
    register_model_configs(config["model"]["model_config_dir"])
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(
        config["model"]["name"], pretrained=str(run / "final" / "open_clip.safetensors"))
    model.eval()
    urls = sorted(glob.glob(str(shards / "*.tar")))
    pipeline = (wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;jpeg;webp", "__key__")
                .map_tuple(preprocess, lambda key: key).batched(batch_size))
    n, first = 0, None
    with torch.no_grad():
        for images, _ in pipeline:
            model.encode_image(images)
            n += len(images)
            first = first or time.perf_counter()
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
            "images_per_s_after_first_batch": round((n - batch_size) / (time.perf_counter() - first), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--startup-rounds", type=int, default=2, help="start-up measurements per backend")
    parser.add_argument("--startup-only", action="store_true", help="measure the start-up only, no throughput runs")
    parser.add_argument("--out", default="/tmp/extract_throughput.json")
    args = parser.parse_args()
    import ray

    from serving.extract import EncoderSpec, init_ray
    from shards.synth import generate
    from training.export.exporter import export_run

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    generate(work / "shards", task="retrieval", n_train=args.images, n_val=10, seed=0, shard_size=args.shard_size,
             image_size=64)
    shards = work / "shards" / "train"
    run = make_run(args.model, work / "run")
    export_run(run, work / "onnx", int8=True)
    torch_spec, onnx_spec = EncoderSpec(KIND, str(run)), EncoderSpec("onnx", str(work / "onnx"), int8=True)
    onnx_fp32_spec = EncoderSpec("onnx", str(work / "onnx"))
    init_ray(num_cpus=2)
    startup: dict[str, list] = {"torch_run": [], "onnx_fp32": [], "onnx_int8": []}
    for _ in range(args.startup_rounds):
        for name, spec in (("torch_run", torch_spec), ("onnx_fp32", onnx_fp32_spec), ("onnx_int8", onnx_spec)):
            startup[name].append(startup_seconds(spec, args.batch_size))
    print(json.dumps({"startup_seconds": startup}), flush=True)
    if args.startup_only:
        ray.shutdown()
        summary = {"model": args.model, "batch_size": args.batch_size, "startup_seconds_to_first_batch": startup,
                   "startup_torch_run_vs_onnx_int8": round(min(startup["torch_run"]) / min(startup["onnx_int8"]), 2),
                   "load_average_at_end": os.getloadavg()}
        Path(args.out).write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return 0
    results: dict[str, list] = {"ray_1_actor": [], "ray_2_actors": [], "onnx_int8_1_actor": [],
                                "onnx_int8_2_actors": [], "plain_loop": [], "openclip_webdataset_loop": []}
    for round_ in range(args.rounds):
        results["onnx_int8_1_actor"].append(ray_run(onnx_spec, shards, work / f"q1-{round_}", 1, args.batch_size))
        results["onnx_int8_2_actors"].append(ray_run(onnx_spec, shards, work / f"q2-{round_}", 2, args.batch_size))
        results["ray_1_actor"].append(ray_run(torch_spec, shards, work / f"o1-{round_}", 1, args.batch_size))
        results["ray_2_actors"].append(ray_run(torch_spec, shards, work / f"o2-{round_}", 2, args.batch_size))
        results["plain_loop"].append(plain_run(run, shards, args.batch_size))
        results["openclip_webdataset_loop"].append(openclip_webdataset_run(run, shards, args.batch_size))
        print(json.dumps({k: v[-1] for k, v in results.items()}, indent=1), flush=True)
    ray.shutdown()
    one, two = results["ray_1_actor"][-1], results["ray_2_actors"][-1]
    q1, q2, plain = results["onnx_int8_1_actor"][-1], results["onnx_int8_2_actors"][-1], results["plain_loop"][-1]
    summary = {"model": args.model, "images": args.images, "results": results,
               "startup_seconds_to_first_batch": startup,
               "startup_torch_run_vs_onnx_int8": round(min(startup["torch_run"]) / min(startup["onnx_int8"]), 2),
               "speedup_2_vs_1_actor": round(two["images_per_s_after_first_batch"]
                                             / one["images_per_s_after_first_batch"], 2),
               "onnx_int8_speedup_2_vs_1_actor": round(q2["images_per_s_after_first_batch"]
                                                       / q1["images_per_s_after_first_batch"], 2),
               "onnx_int8_2_actors_vs_plain_loop": round(q2["images_per_s"] / plain["images_per_s"], 2),
               "onnx_int8_2_actors_vs_openclip_webdataset_loop": round(
                   q2["images_per_s"] / results["openclip_webdataset_loop"][-1]["images_per_s"], 2),
               "torch_2_actors_vs_plain_loop": round(two["images_per_s"] / plain["images_per_s"], 2),
               "load_average_at_end": os.getloadavg()}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
