"""Kill every long-running tool at random points and check what it leaves behind (issue #18).

    .venv/bin/python benchmarks/fault_injection.py --n 3 --work /tmp/faults [--seed 0] [--stages convert train ...]

Each stage runs once cleanly (the reference and its duration), then N times killed with SIGKILL to its whole
process group after a random delay in [0.5 s, 0.8 x the reference duration], each kill followed by the
tool's own recovery. After every recovery the output is compared with the reference:

    convert  python -m shards.synth: a killed set is refused by every reader (UnfinishedShardSet); the rerun
             with --overwrite writes the reference's samples, byte for byte
    train    deepspeed, 2 CPU ranks, a checkpoint every 2 steps: --resume finishes; every step 1..max_steps is
             logged, metrics.json parses and the final weights load (safetensors)
    export   launch/export.py --overwrite over an earlier export: after the kill the folder is the earlier
             export whole or the new one whole (every file verifies against its manifest), never a mix;
             the rerun verifies
    extract  launch/extract.py on a running Ray cluster (the driver is killed): the rerun resumes, and every
             key's embedding equals the reference's, each key once
    search   launch/search.py: the rerun's neighbours equal the reference's

Prints one line per attempt and a markdown table for docs/benchmarks.md. Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
BIN = Path(PY).parent
TRAIN_STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_killed(cmd: list[str], delay: float) -> bool:
    """Start ``cmd`` in its own process group and SIGKILL the group after ``delay`` s; True if it was killed
    (False: it had finished before)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # let the kernel release the run lock and the ports
        return True


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    run(cmd)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the checks


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every member of every shard of a finished set (refuses an unfinished one, as every reader does)."""
    from shards.samples import expand_urls, tar_members

    return {f"{Path(url).name}/{name}": data for url in expand_urls(str(folder)) for name, data in tar_members(url)}


def check_train(run_dir: Path) -> str:
    from safetensors.numpy import load_file

    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("kind") == "train"]
    if sorted(set(steps)) != list(range(1, TRAIN_STEPS + 1)):
        return f"logged steps {sorted(set(steps))}"
    json.loads((run_dir / "metrics.json").read_text())
    load_file(str(run_dir / "final" / "model.safetensors"))
    return ""


def export_fingerprint(folder: Path) -> str:
    """What the export holds (every graph's and file's sha256), once every file it lists verifies against
    its manifest (raises otherwise). Two exports of the same weights and options have the same one."""
    from serving.model import ExportedModel

    model = ExportedModel(folder)
    held = {"files": model.manifest["files"]}
    for relative in model.manifest["files"]:
        model.file(relative)
    for name, graph in model.manifest["graphs"].items():
        entries = [graph, *(graph[p] for p in ("int8", "fp16") if p in graph)]
        for entry in entries:
            model.file(entry["file"], entry["sha256"])
        held[name] = [entry["sha256"] for entry in entries]
    return json.dumps(held, sort_keys=True)


def embeddings(folder: Path) -> dict[str, list[float]]:
    from serving.extract import read_embeddings

    keys, values = read_embeddings(folder, "image_embedding")
    if len(keys) != len(set(keys)):
        raise ValueError(f"{folder}: a key appears twice")
    return dict(zip(keys, values.round(5).tolist()))


def neighbours(folder: Path) -> dict[str, list[int]]:
    from serving.search import read_results

    return {k: ids.tolist() for k, (ids, _) in read_results(folder, "image_embedding").items()}


# --------------------------------------------------------------------------- the stages


class Bench:
    def __init__(self, work: Path, n: int, seed: int):
        self.work, self.n, self.rng = work, n, random.Random(seed)
        self.rows: list[tuple[str, int, int, int, str]] = []
        self.data = work / "data"
        self.run_dir = work / "run"

    def delay(self, reference: float) -> float:
        return self.rng.uniform(0.5, max(0.6, 0.8 * reference))  # most kills land mid-run

    def attempts(self, stage: str, reference: float, attempt) -> None:
        killed = failed = 0
        notes = []
        for i in range(self.n):
            delay = self.delay(reference)
            was_killed, problem = attempt(delay)
            killed += was_killed
            failed += bool(problem)
            print(f"{stage} #{i + 1}: kill after {delay:.1f} s ({'killed' if was_killed else 'had finished'}): "
                  f"{problem or 'ok'}", flush=True)
            if problem:
                notes.append(problem)
        self.rows.append((stage, self.n, killed, failed, "; ".join(notes) or "nothing lost, mixed or torn"))

    def synth_cmd(self, out: Path) -> list[str]:
        return [PY, "-m", "shards.synth", "--out", str(out), "--task", "retrieval", "--train", "1600", "--val",
                "200", "--shard-size", "100", "--seed", "0", "--image-size", "64", "--overwrite"]

    def convert(self) -> None:
        reference = timed(self.synth_cmd(self.data))
        expected = {split: shard_bytes(self.data / split) for split in ("train", "val")}
        out = self.work / "convert"

        def attempt(delay: float):
            from shards.samples import UnfinishedShardSet

            killed = run_killed(self.synth_cmd(out), delay)
            problem = ""
            try:  # a killed set is refused, unless it had finished both splits when the kill came
                if {split: shard_bytes(out / split) for split in expected} != expected:
                    problem = "a killed set was read as complete with other samples"
            except (UnfinishedShardSet, FileNotFoundError):
                pass
            run(self.synth_cmd(out))
            rerun = {split: shard_bytes(out / split) for split in expected}
            return killed, problem or ("" if rerun == expected else "the rerun's samples differ")

        self.attempts("convert", reference, attempt)

    def config(self, run_dir: Path) -> Path:
        import yaml

        raw = {"run": {"output_dir": str(run_dir), "seed": 0},
               "model": {"name": "tiny-vit", "model_config_dir": str(ROOT / "configs" / "models")},
               "data": {"train": str(self.data / "train"), "val": str(self.data / "val"), "num_workers": 1,
                        "shuffle_buffer": 100},
               "tasks": [{"name": "retrieval"}],
               "optim": {"micro_batch_size": 16, "max_steps": TRAIN_STEPS, "warmup_steps": 1},
               "schedule": {"log_every": 1, "checkpoint_every": 2},
               "eval": {"batch_size": 100, "max_samples": 100}}
        path = self.work / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def train_cmd(self, config: Path, *extra: str) -> list[str]:
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                "--config", str(config), *extra]

    def train(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        reference = timed(self.train_cmd(self.config(self.run_dir)))

        def attempt(delay: float):
            run_dir = self.work / "train_killed"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = self.config(run_dir)
            killed = run_killed(self.train_cmd(config), delay)
            run(self.train_cmd(config, "--resume"))
            return killed, check_train(run_dir)

        self.attempts("train", reference, attempt)

    def export(self) -> None:
        first = self.work / "export_first"
        shutil.rmtree(first, ignore_errors=True)
        run([PY, "launch/export.py", "--checkpoint", str(self.run_dir), "--out", str(first)])
        new_cmd = [PY, "launch/export.py", "--checkpoint", str(self.run_dir), "--int8", "--overwrite"]
        second = self.work / "export_second"
        shutil.rmtree(second, ignore_errors=True)
        reference = timed([*new_cmd, "--out", str(second)])
        allowed = {export_fingerprint(first), export_fingerprint(second)}

        def attempt(delay: float):
            target = self.work / "export_target"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(first, target)
            killed = run_killed([*new_cmd, "--out", str(target)], delay)
            try:
                problem = "" if export_fingerprint(target) in allowed else "a manifest of neither export"
            except (FileNotFoundError, ValueError) as err:
                problem = f"mixed or torn: {err}"
            run([*new_cmd, "--out", str(target)])
            return killed, problem or ("" if export_fingerprint(target) in allowed else "rerun: wrong export")

        self.attempts("export", reference, attempt)

    def ray_stages(self, stages: list[str]) -> None:
        port, temp = free_port(), Path("/tmp") / f"ray_faults_{os.getpid()}"
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                 "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
                                 "--num-cpus=2", f"--temp-dir={temp}",
                                 "--disable-usage-stats", "--block"],
                                env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_for(port)
            address = f"127.0.0.1:{port}"
            if "extract" in stages:
                self.extract(address)
            else:
                shutil.rmtree(self.work / "extract", ignore_errors=True)
                run(self.extract_cmd(self.work / "extract", address))
            if "search" in stages:
                self.search(address)
        finally:  # stop this cluster only (never `ray stop`, which stops every Ray on the machine)
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
            subprocess.run(["pkill", "-f", str(temp)], capture_output=True)

    @staticmethod
    def _wait_for(port: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"Ray did not listen on {port}")

    def extract_cmd(self, out: Path, address: str) -> list[str]:
        return [PY, "launch/extract.py", "--model", str(self.work / "export_second"), "--shards",
                str(self.data / "train"), "--out", str(out), "--address", address, "--actors", "1",
                "--batch-size", "64"]

    def extract(self, address: str) -> None:
        self.rerun_equal("extract", lambda out: self.extract_cmd(out, address), embeddings)

    def rerun_equal(self, stage: str, cmd, read) -> None:
        """A reference run into <work>/<stage>, then killed runs each rerun once: the same output, key by key."""
        reference_dir = self.work / stage
        shutil.rmtree(reference_dir, ignore_errors=True)
        reference = timed(cmd(reference_dir))
        expected = read(reference_dir)

        def attempt(delay: float):
            out = self.work / f"{stage}_killed"
            shutil.rmtree(out, ignore_errors=True)
            killed = run_killed(cmd(out), delay)
            run(cmd(out))
            found = read(out)
            wrong = sum(found.get(k) != v for k, v in expected.items()) + len(set(found) - set(expected))
            return killed, f"{wrong} of {len(expected)} keys differ, are missing or extra" if wrong else ""

        self.attempts(stage, reference, attempt)

    def search_cmd(self, out: Path, address: str) -> list[str]:
        return [PY, "launch/search.py", "--model", str(self.work / "export_second"), "--queries",
                str(self.work / "extract"), "--corpus", str(self.corpus()), "--out", str(out), "--k", "4",
                "--address", address, "--actors", "1"]

    def corpus(self) -> Path:
        path = self.work / "corpus.txt"
        if not path.is_file():
            captions = [json.loads(data)["caption"] for name, data in shard_bytes(self.data / "val").items()
                        if name.endswith(".json")]
            path.write_text("\n".join(captions * 20) + "\n")
        return path

    def search(self, address: str) -> None:
        self.rerun_equal("search", lambda out: self.search_cmd(out, address), neighbours)

    def table(self) -> str:
        lines = ["| stage | attempts | killed mid-run | failed checks | outcome |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {n} | {k} | {f} | {o} |" for s, n, k, f, o in self.rows]
        return "\n".join(lines)


STAGES = ("convert", "train", "export", "extract", "search")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3, help="killed runs per stage")
    parser.add_argument("--work", default="/tmp/multiclip_faults", help="scratch folder (created; its content is ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, args.n, args.seed)
    started = time.perf_counter()
    bench.convert() if "convert" in args.stages else run(bench.synth_cmd(bench.data))  # every stage's data
    if {"train", "export", "extract", "search"} & set(args.stages):
        if "train" in args.stages:
            bench.train()
        else:
            shutil.rmtree(bench.run_dir, ignore_errors=True)
            run(bench.train_cmd(bench.config(bench.run_dir)))
    if {"export", "extract", "search"} & set(args.stages):
        if "export" in args.stages:
            bench.export()
        else:
            run([PY, "launch/export.py", "--checkpoint", str(bench.run_dir), "--int8", "--overwrite", "--out",
                 str(work / "export_second")])
    if {"extract", "search"} & set(args.stages):
        bench.ray_stages(args.stages)
    print(f"\n{bench.table()}\n\n({time.perf_counter() - started:.0f} s in all)")
    return 1 if any(row[3] for row in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
