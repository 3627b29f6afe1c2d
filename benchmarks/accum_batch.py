"""Contrastive batch vs memory: plain micro batches, feature-caching accumulation, one plain big batch.

    python benchmarks/accum_batch.py --micro 32 --accum 8 --steps 8

Three real training runs (launch/train.py, one process, tiny ViT from scratch, fp32, retrieval InfoNCE) on the
same synthetic shards: (a) plain micro batch B (contrastive batch B), (b) ``accum_mode: features`` with micro
batch B x grad_accum k (contrastive batch B*k), (c) plain micro batch B*k, grad_accum 1 (contrastive batch B*k;
``--skip-big`` when it does not fit). Reported per run: the median training samples/s over the logging windows
after the first, and the peak RSS of the process tree (trainer + its data-loader worker). The question it
answers: which contrastive batch a run reaches at the memory of (a). Figures: docs/benchmarks.md,
"Feature-caching accumulation: contrastive batch vs memory".
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import multiclip_config, peak_memory_of, bench_env  # noqa: E402


def run(shards: Path, work: Path, name: str, steps: int, micro: int, accum: int, mode: str) -> dict:
    """One training run of the real trainer; samples/s, peak RSS and the contrastive batch it trains with."""
    out = work / name
    config = multiclip_config(shards, out, steps, micro)
    config["optim"].update({"grad_accum": accum, "accum_mode": mode})
    config["eval"] = {"max_samples": 100, "batch_size": 100}
    config["schedule"] = {"log_every": 2}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(path)], cwd=ROOT, env=bench_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True).start()
    code, peak, _ = peak_memory_of(proc)
    if code != 0:
        raise RuntimeError(f"{name} failed:\n" + "".join(tail[-30:]))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:]
    contrastive = micro * accum if mode == "features" else micro
    return {"run": name, "micro_batch": micro, "grad_accum": accum, "accum_mode": mode,
            "contrastive_batch": contrastive, "samples_per_s": round(statistics.median(rates), 1),
            "peak_rss_mib": round(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=32, help="micro batch B")
    parser.add_argument("--accum", type=int, default=8, help="micro batches per step k")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (log every 2)")
    parser.add_argument("--skip-big", action="store_true", help="leave out (c), the plain batch of B*k")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    from shards.synth import generate

    with tempfile.TemporaryDirectory(prefix="accum_batch_") as tmp:
        work = Path(tmp)
        generate(work / "shards", task="retrieval", n_train=max(1600, 2 * args.steps * args.micro * args.accum),
                 n_val=200, seed=0, shard_size=400, image_size=64)
        plans = [("a_plain_micro", args.micro, 1, "gradients"), ("b_features", args.micro, args.accum, "features")]
        if not args.skip_big:
            plans.append(("c_plain_big", args.micro * args.accum, 1, "gradients"))
        rows = []
        for name, micro, accum, mode in plans:
            rows.append(run(work / "shards", work, name, args.steps, micro, accum, mode))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| run | micro x accum | contrastive batch | samples/s | peak RSS (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} ({r['accum_mode']}) | {r['micro_batch']} x {r['grad_accum']} | {r['contrastive_batch']} "
              f"| {r['samples_per_s']} | {r['peak_rss_mib']} |")
    if args.out:
        from shards.atomic import write_json

        write_json(args.out, {"args": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
