"""Image-encoder throughput: torch eager vs onnxruntime, on CPU (and on a GPU when one is present).

    python benchmarks/infer_throughput.py --configs tiny-vit ViT-B-32 --batches 1 32 --rounds 3

CPU: open_clip's image tower with random weights (no downloads), exported with training.export (the
same code as launch/export.py), in fp32 and as the int8 copy of ``export --int8`` (dynamic
quantisation, checked by cosine to fp32), against torch eager fp32 and torch's own dynamic int8
quantisation of the Linear layers. Each round measures every (config, batch,
backend) once, alternating torch and onnxruntime, so background load hits both alike; the figure is
the median images/s over rounds. Both use the same thread count (``--threads``, default: the cores
this process may use); onnxruntime runs with ORT_ENABLE_ALL, sequential execution, inter-op 1.

GPU (only when torch sees CUDA): ViT-B-32 at batch 256, torch eager bf16 vs onnxruntime CUDA fp16
vs TensorRT fp16 (engine cache in the temp folder, built before timing). Images/s includes the
host->device copy of the batch and the copy of the embeddings back. Fraction of peak =
images/s x 8.8 GFLOP/image / the GPU's dense bf16 peak (``--peak-tflops``; known GPUs listed below).

Every figure is recorded (and printed) with ``provider``: for onnxruntime the provider the session
really runs on (``Session.providers_in_use``, not the request), for torch its device. An onnxruntime
GPU run whose provider did not load (it would run on the CPU) is not timed: it is recorded with
``skipped`` and the reason, so no CPU figure appears under a CUDA or TensorRT label.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training  # noqa: E402,F401  (torchvision compatibility before open_clip)
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402

from training.export.exporter import Graph, ImageEncoder, export_graph  # noqa: E402
from serving.runtime import RuntimeOptions, Session  # noqa: E402

GFLOP_PER_IMAGE = {"ViT-B-32": 8.8}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def build(name: str) -> torch.nn.Module:
    open_clip.add_model_config(ROOT / "configs" / "models")
    model = open_clip.create_model(name, pretrained=None)
    return model.eval()


def export_image_encoder(model: torch.nn.Module, out: Path, fp16: bool = False, int8: bool = False) -> dict:
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    graph = Graph("image_encoder", ImageEncoder(model), {"pixels": torch.randn(4, 3, size, size)}, ["image_features"])
    return export_graph(graph, out, (("fp16",) if fp16 else ()) + (("int8",) if int8 else ()))


def images_per_s(fn, batch: int, min_seconds: float, min_iters: int) -> float:
    fn()  # warm-up (allocations, first-call graph work)
    done, start = 0, time.perf_counter()
    while done < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        done += 1
    return done * batch / (time.perf_counter() - start)


def torch_int8(model: torch.nn.Module) -> torch.nn.Module:
    """torch's own dynamic int8 quantisation of the Linear layers: what a torch user would reach for."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def in_use(session: Session) -> str:
    """The provider that runs the graph (the first one the session has), as recorded next to each figure."""
    return session.providers_in_use[0]


def cpu_setup(name: str, out: Path, threads: int) -> dict:
    """The four CPU runners of one config: torch and onnxruntime, fp32 and dynamic int8."""
    model = build(name)
    entry = export_image_encoder(model, out, int8=True)
    options = RuntimeOptions(providers=("cpu",), intra_op_threads=threads, optimization="all")
    size = model.visual.image_size
    return {"model": model, "int8_model": torch_int8(model), "size": size if isinstance(size, int) else size[0],
            "session": Session(out / entry["file"], options), "int8_session": Session(out / entry["int8"]["file"], options),
            "int8_cosine": entry["int8"]["min_cosine_to_fp32"]}


CPU_PROVIDERS = {"torch": lambda setup: "torch cpu", "onnxruntime": lambda setup: in_use(setup["session"]),
                 "torch int8": lambda setup: "torch cpu", "onnxruntime int8": lambda setup: in_use(setup["int8_session"])}


def cpu_benchmark(args) -> tuple[list[dict], dict]:
    torch.set_num_threads(args.threads)
    results = []
    providers: dict[tuple, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name in args.configs:
            (Path(tmp) / name).mkdir()
            setups[name] = cpu_setup(name, Path(tmp) / name, args.threads)
        samples: dict[tuple, list[float]] = {}
        for round_ in range(args.rounds):
            for name, setup in setups.items():
                for batch in args.batches:
                    x = np.random.default_rng(round_).standard_normal((batch, 3, setup["size"], setup["size"]),
                                                                      dtype=np.float32)
                    xt = torch.from_numpy(x)

                    def run_torch(model):
                        with torch.inference_mode():
                            model.encode_image(xt)

                    order = [("torch", lambda: run_torch(setup["model"])),
                             ("onnxruntime", lambda: setup["session"].run(pixels=x)),
                             ("torch int8", lambda: run_torch(setup["int8_model"])),
                             ("onnxruntime int8", lambda: setup["int8_session"].run(pixels=x))]
                    for backend, fn in (order if round_ % 2 == 0 else order[::-1]):  # alternate who goes first
                        ips = images_per_s(fn, batch, args.min_seconds, args.min_iters)
                        provider = providers[(name, batch, backend)] = CPU_PROVIDERS[backend](setup)
                        samples.setdefault((name, batch, backend), []).append(ips)
                        print(f"round {round_} {name} batch {batch} {backend} [{provider}]: {ips:.1f} img/s", flush=True)
        for (name, batch, backend), values in samples.items():
            results.append({"config": name, "batch": batch, "backend": backend,
                            "provider": providers[(name, batch, backend)], "images_per_s": statistics.median(values),
                            "rounds": values})
        cosines = {name: setup["int8_cosine"] for name, setup in setups.items()}
    return results, cosines


def gpu_session(path: Path, options: RuntimeOptions, label: str) -> tuple[Session | None, dict | None]:
    """(the session, None) when it runs on the GPU provider asked for; else (None, the skipped record)."""
    session = Session(path, options)
    if not session.fallbacks:
        return session, None
    reason = "; ".join(f"{f['provider']}: {f['reason']}" for f in session.fallbacks)
    print(f"{label}: not measured, the session runs on {in_use(session)} ({reason})", flush=True)
    return None, {"backend": label, "provider": in_use(session), "skipped": reason}


def gpu_benchmark(args) -> list[dict] | str:
    if not torch.cuda.is_available():
        return "skipped: no CUDA device visible to torch (the GPU branch needs a GPU, torch CUDA and onnxruntime-gpu)"
    gpu = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    name, batch = "ViT-B-32", args.gpu_batch
    model = build(name).cuda()
    results = []
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    bf16 = model.to(torch.bfloat16)

    def run_torch():
        with torch.inference_mode():
            bf16.encode_image(torch.from_numpy(x).cuda(non_blocking=True).to(torch.bfloat16)).float().cpu()

    with tempfile.TemporaryDirectory() as tmp:
        entry = export_image_encoder(build(name), Path(tmp), fp16=True)
        runs = [("torch eager bf16", None, run_torch)]  # (backend, its onnxruntime session, the timed call)
        cuda, skipped = gpu_session(Path(tmp) / entry["fp16"]["file"], RuntimeOptions(providers=("cuda",), fp16=True),
                                    "onnxruntime CUDA fp16")
        if cuda:
            runs.append(("onnxruntime CUDA fp16", cuda, lambda: cuda.run(pixels=x)))
        else:
            results.append({"gpu": gpu, "config": name, "batch": batch, **skipped})
        trt, skipped = gpu_session(Path(tmp) / entry["file"],
                                   RuntimeOptions(providers=("tensorrt",), fp16=True, trt_cache_dir=str(Path(tmp) / "trt"),
                                                  trt_opt_batch=batch, trt_max_batch=batch), "TensorRT fp16")
        if trt:
            trt.run(pixels=x)  # builds the engine before timing
            runs.append(("TensorRT fp16", trt, lambda: trt.run(pixels=x)))
        else:
            results.append({"gpu": gpu, "config": name, "batch": batch, **skipped})
        for round_ in range(args.rounds):
            for backend, session, fn in runs:
                ips = images_per_s(lambda: (fn(), torch.cuda.synchronize()), batch, args.min_seconds, args.min_iters)
                provider = in_use(session) if session else "torch cuda"  # after the run: a run-time fallback shows
                results.append({"gpu": gpu, "config": name, "batch": batch, "backend": backend, "provider": provider,
                                "round": round_, "images_per_s": ips,
                                "fraction_of_peak": ips * GFLOP_PER_IMAGE[name] * 1e9 / (peak * 1e12) if peak else None})
                print(f"round {round_} {backend} [{provider}]: {ips:.0f} img/s", flush=True)
    return results


def speedups(cpu: list[dict]) -> list[dict]:
    """Per config and batch: images/s of each backend and the ratios at equal precision (and int8 vs fp32 torch)."""
    table = {(r["config"], r["batch"], r["backend"]): r["images_per_s"] for r in cpu}
    provider = {(r["config"], r["batch"], r["backend"]): r["provider"] for r in cpu}
    rows = []
    for config, batch in sorted({(c, b) for c, b, _ in table}):
        ips = {backend: table[(config, batch, backend)] for c, b, backend in table if (c, b) == (config, batch)}
        rows.append({"config": config, "batch": batch, **ips,
                     "providers": {backend: provider[(config, batch, backend)] for backend in ips},
                     "onnxruntime_vs_torch_fp32": ips["onnxruntime"] / ips["torch"],
                     "onnxruntime_vs_torch_int8": ips["onnxruntime int8"] / ips["torch int8"],
                     "onnxruntime_int8_vs_torch_fp32": ips["onnxruntime int8"] / ips["torch"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["tiny-vit", "ViT-B-32"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cpu, int8_cosines = cpu_benchmark(args)
    gpu = gpu_benchmark(args)
    report = {"settings": {"threads": args.threads, "ort_graph_optimization": "ORT_ENABLE_ALL", "ort_inter_op_threads": 1,
                           "torch": torch.__version__, "onnxruntime": ort.__version__, "rounds": args.rounds,
                           "min_seconds": args.min_seconds, "cpu_count": os.cpu_count()},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu": cpu, "cpu_speedup": speedups(cpu), "int8_min_cosine_to_fp32": int8_cosines, "gpu": gpu}
    print(json.dumps(report["cpu_speedup"], indent=1))
    print("int8 cosine to fp32:", int8_cosines)
    print("GPU:", gpu if isinstance(gpu, str) else json.dumps(gpu, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
