"""Ray feature extraction: a real local cluster, the Jobs API, resume, bad records, in-process parity."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, in_process_embeddings

RAY = str(Path(sys.executable).parent / "ray")
EXCLUDES = [".venv", "data", "runs", ".cache", ".git", "*.tar", "*.safetensors", "*.npy"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_with_bad_records(path: Path) -> None:
    """Two good samples, a truncated JPEG and a json that does not parse."""
    from PIL import Image

    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, format="JPEG")
    good, meta = jpeg.getvalue(), json.dumps({"gold_location": "x", "gold_time": "2017"}).encode()
    with tarfile.open(path, "w") as tar:
        for key, image, js in (("ok1", good, meta), ("brokenjpg", good[: len(good) // 3], meta),
                               ("badjson", good, b"{not json"), ("ok2", good, meta)):
            add(tar, f"{key}.jpg", image)
            add(tar, f"{key}.json", js)


@pytest.fixture
def ray_cluster(tmp_path):
    """A real local cluster (head node with dashboard / Jobs API; node IP given as 127.0.0.1), stopped afterwards."""
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"ray_{os.getpid()}_{port}"  # short: Ray's socket paths have a length limit
    # a plain `ray start` as users run it: on Linux Ray still registers the main interface's address (and
    # its Jobs API agent needs that); serving.extract joins it as usual, and its own local Ray on loopback only
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",  # not Ray's fixed 52365: another
             "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",  # Ray here would hold it (no job agent)
             "--disable-usage-stats", "--block"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: stopping it stops this cluster only
    try:
        _wait_for_port(port, head)
        _wait_for_port(dash, head)  # the dashboard (Jobs API) comes up after the GCS
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _stop_own_cluster(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_port(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, f"ray start exited: {head.stderr.read()[-2000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not listen on {port} within {timeout} s")


def _stop_own_cluster(head: subprocess.Popen) -> None:
    """Stop the cluster this fixture started, and nothing else (never ``ray stop`` or a kill by name): the
    processes descended from its blocking ``ray start`` (GCS, raylet, dashboard, workers), listed before
    the stop: the ``ray start`` process, then its process group; whatever of that list outlives a grace
    period is killed."""
    import signal

    import psutil

    try:
        started = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    # the blocking `ray start` first, alone: it drains its node through the GCS and stops its children
    # (a SIGTERM to the whole group killed the GCS too, and the drain then waited 30 s for it)
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(started, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.Error):  # psutil refuses a pid another process has taken since
            proc.kill()


def _submit_and_wait(dashboard: str, entrypoint: str, timeout: float = 240) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.time() + timeout
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        try:
            job = client.submit_job(entrypoint=entrypoint,
                                    runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(1)
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status), client.get_job_logs(job)
        time.sleep(1)
    client.stop_job(job)
    return "TIMEOUT", client.get_job_logs(job)


def test_job_extracts_resumes_and_matches_in_process(geo_run, ray_cluster, tmp_path):
    from serving.extract import MANIFEST, PARTS, part_name, read_embeddings

    run, shards = geo_run
    data = tmp_path / "data"
    shutil.copytree(shards / "val", data)
    _shard_with_bad_records(data / "shard-000099.tar")  # unlisted in sizes.json: read (writer-named), with a warning
    out = tmp_path / "feats"
    command = f"{sys.executable} launch/extract.py --run {run} --shards {data} --out {out} --batch-size 32"
    status, logs = _submit_and_wait(ray_cluster["dashboard"], command)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "shards]" in logs  # per-shard progress lines

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["shards"] == {"total": 4, "done": 4}
    assert manifest["samples"] == 120 + 2
    named = {(r["key"], r["reason"]) for r in manifest["skipped"]["records"]}
    assert {("brokenjpg", "bad_image"), ("badjson", "bad_json")} <= named
    assert manifest["columns"]["geo_time_location_cls"] == [2, 64]
    assert manifest["encoder"]["weights_sha256"] and manifest["encoder"]["config_sha256"]

    reference = in_process_embeddings(run, shards / "val")
    for column in ("image_embedding", "geo_time_image", "geo_time_location_cls", "geo_time_time_cls"):
        keys, values = read_embeddings(out, column)
        assert len(keys) == len(set(keys)) == 122
        good = [(k, v) for k, v in zip(keys, values) if k in reference]
        assert len(good) == 120
        np.testing.assert_allclose(np.stack([v for _, v in good]), np.stack([reference[k][column] for k, _ in good]),
                                   atol=2e-5, rtol=1e-4)

    # resume on the running cluster (--address): only the shard whose output is gone is embedded again
    lost = part_name(str(data / "shard-000001.tar"))
    (out / PARTS / f"{lost}.done.json").unlink()
    kept = out / PARTS / f"{part_name(str(data / 'shard-000000.tar'))}.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    import ray

    from serving.extract import EncoderSpec, ExtractOptions, extract, init_ray
    from training.extract_torch import KIND  # registers the torch-run backend here and, by the pickled spec, in workers

    init_ray(address=ray_cluster["address"])
    try:
        manifest = extract(str(data), out, EncoderSpec(KIND, str(run)), ExtractOptions(actors=1))
    finally:
        ray.shutdown()
    assert manifest["this_run"]["embedded"] == 40 and manifest["samples"] == 122
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert kept.stat().st_mtime_ns == kept_mtime


def nothing_mixed(shard_dir: Path, tmp_path: Path, spec, other_spec) -> None:
    """A killed run resumed with another model is refused; a shard regenerated in place is embedded again;
    a folder the job did not write is neither used nor deleted (runs inside an initialised Ray)."""
    import shutil

    from serving.extract import MANIFEST, PARTS, ExtractOptions, extract, part_name

    data, out = tmp_path / "mixed_data", tmp_path / "mixed"
    shutil.copytree(shard_dir, data)
    first = extract(str(data), out, spec, ExtractOptions(actors=1, batch_size=32))
    shards = sorted(data.glob("*.tar"))
    (out / MANIFEST).unlink()  # killed before the end: the manifest was never written, two shards not finished
    for url in shards[:2]:
        (out / PARTS / f"{part_name(str(url))}.done.json").unlink()
    with pytest.raises(ValueError, match="another model"):
        extract(str(data), out, other_spec, ExtractOptions(actors=1))
    resumed = extract(str(data), out, spec, ExtractOptions(actors=1, batch_size=32))
    assert resumed["samples"] == first["samples"] and resumed["this_run"]["embedded"] == 40 + 40
    assert len(shards) == 3
    shards[-1].write_bytes(shards[-1].read_bytes())  # regenerated in place: same name, new mtime
    again = extract(str(data), out, spec, ExtractOptions(actors=1, batch_size=32))
    assert again["this_run"]["embedded"] == 40 and again["samples"] == first["samples"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an extraction output"):
        extract(str(data), foreign, spec, ExtractOptions(actors=1))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_onnx_actors_embed_like_the_torch_run_and_need_no_torch(geo_run, tmp_path):
    """The Ray job on the exported model (fp32 and int8 towers) against training's own encode, in process."""
    import ray

    from conftest import _run
    from serving.extract import EncoderSpec, ExtractOptions, extract, init_ray, read_embeddings

    run, shards = geo_run
    export = tmp_path / "onnx"
    proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export), "--int8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    init_ray(num_cpus=2)
    try:
        fp32 = extract(str(shards / "val"), tmp_path / "fp32", EncoderSpec("onnx", str(export)),
                       ExtractOptions(actors=1, batch_size=32))
        int8 = extract(str(shards / "val"), tmp_path / "int8", EncoderSpec("onnx", str(export), int8=True),
                       ExtractOptions(actors=1, batch_size=32))
        with pytest.raises(ValueError, match="another model"):  # int8 outputs never join fp32 ones
            extract(str(shards / "val"), tmp_path / "fp32", EncoderSpec("onnx", str(export), int8=True),
                    ExtractOptions(actors=1))
        nothing_mixed(shards / "val", tmp_path, EncoderSpec("onnx", str(export)), EncoderSpec("onnx", str(export), int8=True))
    finally:
        ray.shutdown()
    assert fp32["encoder"]["backend"] == "onnx" and int8["encoder"]["backend"] == "onnx-int8"
    assert fp32["samples"] == int8["samples"] == 120
    assert fp32["columns"]["geo_time_location_cls"] == [2, 64]
    reference = in_process_embeddings(run, shards / "val")
    for column in ("image_embedding", "geo_time_image", "geo_time_location_cls", "geo_time_time_cls"):
        keys, values = read_embeddings(tmp_path / "fp32", column)
        np.testing.assert_allclose(values, np.stack([reference[k][column] for k in keys]), atol=1e-4)
    keys, values = read_embeddings(tmp_path / "int8", "image_embedding")
    expected = np.stack([reference[k]["image_embedding"] for k in keys])
    assert np.min(np.sum(values * expected, axis=1)) > 0.99  # both normalised: cosine

    probe = (f"import sys, numpy as np; from pathlib import Path; from serving.extract import OnnxExportEncoder; "
             f"e = OnnxExportEncoder(Path({str(export)!r}), int8=True); e.encode(np.zeros((2, 3, 64, 64), np.float32)); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'training')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr[-2000:]
