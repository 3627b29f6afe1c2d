"""Nothing reached from outside (issue #18): a local run's processes listen on loopback only.

Both checks list the TCP sockets that the processes started (and all their descendants) listen on, while
they run: a real 2-rank deepspeed job (rendezvous store and gloo) and a local Ray from ``init_ray`` (GCS,
raylet, workers, agents, metrics endpoints).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from conftest import DEEPSPEED, ROOT, _free_port, _write_config, tiny_config


def _listening(root_pid: int) -> dict[tuple[str, int], str]:
    """{(address, port): process name} of the TCP sockets ``root_pid`` and its descendants listen on."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for proc in procs:
        try:
            found.update({(c.laddr.ip, c.laddr.port): proc.name() for c in proc.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN})
        except psutil.Error:  # it ended meanwhile
            pass
    return found


def _exposed(listening: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    """The sockets of ``listening`` on anything but loopback (0.0.0.0 and :: included)."""
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)

    return {k: v for k, v in listening.items() if not loopback(k[0])}


def test_two_rank_job_listens_on_loopback_only(retrieval_shards, tmp_path):
    raw = tiny_config(retrieval_shards, tmp_path / "run", optim={"max_steps": 2},
                      eval={"max_samples": 20, "batch_size": 20})
    port = _free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
           "--config", str(_write_config(tmp_path, raw))]
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                               stderr=subprocess.STDOUT)
    seen: dict[tuple[str, int], str] = {}
    deadline = time.time() + 240
    while job.poll() is None and time.time() < deadline:
        seen.update(_listening(job.pid))
        time.sleep(0.1)
    if job.poll() is None:
        job.kill()
    assert job.wait() == 0, log.read_text()[-3000:]
    assert port in {p for _, p in seen}, f"the rendezvous store was never seen listening: {seen}"
    assert not _exposed(seen), f"listening beyond loopback: {_exposed(seen)}"


RAY_DRIVER = """
import sys
import ray
from serving.extract import init_ray
init_ray(num_cpus=1)
ray.get(ray.remote(lambda: 0).remote())  # a worker, with its own gRPC server
open(sys.argv[1], "w").close()
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    # its own Ray temp dir: ray.init() would join a `ray start` cluster it finds in the default one;
    # short, for Ray's socket paths have a length limit
    temp = tempfile.mkdtemp(prefix="ray18_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=temp, RAY_AUTH_MODE="disabled")
    # a `ray start` cluster that died and left its address file: a local run starts its own Ray beside it
    # (ray.init() with no address would try to join it, and refuse num_cpus even if it were alive)
    Path(temp, "ray").mkdir()
    Path(temp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    ready, log = tmp_path / "ready", tmp_path / "ray.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-c", RAY_DRIVER, str(ready)], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    seen: dict[tuple[str, int], str] = {}
    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.time() + 120
        while not ready.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert ready.exists(), log.read_text()[-3000:]
        for _ in range(15):  # agents and metrics endpoints may come up after ray.init returns
            seen.update(_listening(driver.pid))
            started.update((p.pid, p) for p in psutil.Process(driver.pid).children(recursive=True))
            time.sleep(0.2)
    finally:
        driver.stdin.close()  # the driver shuts its Ray down
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
        for proc in started.values():  # what this test's driver started, should any outlive ray.shutdown
            try:
                proc.kill()  # psutil refuses a pid that another process has taken since
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers were not seen listening: {seen}"
    assert not _exposed(seen), f"listening beyond loopback: {_exposed(seen)}"
