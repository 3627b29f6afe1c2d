"""Runs whose ``run.output_dir`` is an fsspec URL (``s3://bucket/runs/x``, ``gs://…``, ``file:///…``).

DeepSpeed writes checkpoints as local files, so the run is written to a local *staging* folder
(``run.staging_dir``, default one per URL under the system's temporary folder) and mirrored to the URL
(docs/checkpoints.md, "Runs on an fsspec location"):

* after each complete checkpoint, the local rank 0 of every node uploads the files of that tag it has
  (on one node: every rank's ZeRO shards; on several nodes without a shared file system each node holds
  its own ranks' shards), all ranks meet at a barrier, then rank 0 uploads ``checkpoints/latest`` last.
  ``latest`` is the completion marker: a reader never follows it to a half-uploaded tag. Remote tags
  that the local pruning removed are deleted there too (only ``step<8 digits>`` tags holding our
  ``run_state.json``);
* at the end rank 0 uploads the rest of the run (logs, metrics, ``final/`` with its ``config.json``
  last, as :func:`training.checkpoint.write_final` orders it locally);
* ``--resume`` first downloads the remote's latest complete checkpoint into the staging folder (each
  node's local rank 0, into a temporary name renamed when whole) unless the staging folder already holds
  it or a newer one.

Every file goes up under a temporary name and is moved to its own name when whole. ``memory://`` cannot
hold a run: its file system lives inside one process, and DeepSpeed's ranks are separate processes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from shards.samples import is_url
from training.config import ConfigError
from training.distributed import DistInfo, barrier

log = logging.getLogger("multiclip.remote")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RUN_STATE = "run_state.json"
TAG = re.compile(r"step\d{8}")
NOT_MIRRORED = {CHECKPOINTS, ".lock"}  # checkpoints go up tag by tag; the lock is this machine's


def default_staging_dir(url: str) -> Path:
    """One local folder per URL, the same for every rank of a node (they must agree without talking)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "multiclip-staging" / digest


class RunMirror:
    """The local folder a run is written to, and (for a URL) the remote folder it is mirrored to."""

    def __init__(self, output_dir: str, staging_dir: str | None, dist_info: DistInfo):
        self.dist_info = dist_info
        self.url = output_dir if is_url(output_dir) else None
        if self.url is None:
            self.local_dir, self.fs, self.root = Path(output_dir), None, None
            return
        import fsspec

        if self.url.startswith("memory://"):
            raise ConfigError(f"run.output_dir = {self.url}: memory:// lives inside one process, and the "
                              "DeepSpeed ranks are separate processes; use a shared fsspec location")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local_dir = Path(staging_dir) if staging_dir else default_staging_dir(self.url)

    @classmethod
    def for_config(cls, cfg, dist_info: DistInfo) -> RunMirror:
        return cls(cfg.run.output_dir, cfg.run.staging_dir, dist_info)

    @property
    def remote(self) -> bool:
        return self.url is not None

    # ------------------------------------------------------------------ upload

    def push_checkpoint(self, tag: str) -> None:
        """Mirror the complete local checkpoint ``tag`` (call on every rank, after the save)."""
        if not self.remote:
            return
        local_ckpt = self.local_dir / CHECKPOINTS
        if self.dist_info.local_rank == 0:
            for path in sorted((local_ckpt / tag).rglob("*")):
                if path.is_file():
                    self._put(path, f"{CHECKPOINTS}/{tag}/{path.relative_to(local_ckpt / tag).as_posix()}")
        barrier()
        if self.dist_info.is_main:
            self._put(local_ckpt / LATEST, f"{CHECKPOINTS}/{LATEST}")  # the completion marker, last
            self._prune_remote(keep={p.name for p in local_ckpt.iterdir() if TAG.fullmatch(p.name)})
            log.info("checkpoint %s mirrored to %s", tag, self.url)
        barrier()

    def push_outputs(self) -> None:
        """Rank 0: everything of the run but its checkpoints; ``final/config.json`` goes last."""
        if not self.remote or not self.dist_info.is_main:
            return
        files = [p for p in sorted(self.local_dir.rglob("*")) if p.is_file()
                 and p.relative_to(self.local_dir).parts[0] not in NOT_MIRRORED]
        last = self.local_dir / "final" / "config.json"
        for path in [p for p in files if p != last] + [p for p in files if p == last]:
            self._put(path, path.relative_to(self.local_dir).as_posix())
        log.info("run mirrored to %s", self.url)

    def _put(self, local: Path, relative: str) -> None:
        """Upload under a temporary name, then move it to its own name: whole or absent."""
        target = f"{self.root}/{relative}"
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        partial = f"{parent}/.{target.rsplit('/', 1)[1]}.partial-{uuid.uuid4().hex[:8]}"
        self.fs.put_file(str(local), partial)
        self.fs.mv(partial, target)

    def _prune_remote(self, keep: set[str]) -> None:
        """Delete remote tags the local pruning removed; only ours (a tag name and a run_state.json)."""
        folder = f"{self.root}/{CHECKPOINTS}"
        for entry in self.fs.ls(folder, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if TAG.fullmatch(name) and name not in keep and self.fs.exists(f"{folder}/{name}/{RUN_STATE}"):
                self.fs.rm(f"{folder}/{name}", recursive=True)

    # ------------------------------------------------------------------ download

    def remote_latest(self) -> str | None:
        """The tag the remote ``checkpoints/latest`` names (its last complete checkpoint), or None."""
        path = f"{self.root}/{CHECKPOINTS}/{LATEST}"
        return self.fs.cat_file(path).decode().strip() if self.fs.exists(path) else None

    def pull_latest_checkpoint(self) -> str | None:
        """On --resume: bring the remote's latest complete checkpoint into the staging folder (call on every
        rank; each node's local rank 0 downloads). Returns the tag now local, or None."""
        if not self.remote:
            return None
        tag = self.remote_latest()
        if self.dist_info.local_rank == 0 and tag is not None:
            self._download(tag)
            if self.dist_info.is_main:
                self._download_run_files()
        barrier()
        return tag

    def _download_run_files(self) -> None:
        """The run's files besides its checkpoints (log.jsonl, skip logs, ...) that the staging folder lacks,
        so that a resumed run appends to its history rather than replacing it on the next upload."""
        for remote in self.fs.find(self.root):
            relative = remote[len(self.root):].lstrip("/")
            local = self.local_dir / relative
            parts = Path(relative).parts
            if parts[0] in NOT_MIRRORED or any(p.startswith(".") for p in parts) or local.exists():
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.download-{os.getpid()}")
            self.fs.get_file(remote, str(partial))
            os.rename(partial, local)

    def _download(self, tag: str) -> None:
        from shards.atomic import write_text

        local_ckpt = self.local_dir / CHECKPOINTS
        latest = local_ckpt / LATEST
        have = latest.read_text().strip() if latest.is_file() else None
        if have is not None and have >= tag and (local_ckpt / have).is_dir():
            log.info("--resume: %s already holds %s (remote latest %s)", local_ckpt, have, tag)
            return
        local_ckpt.mkdir(parents=True, exist_ok=True)
        partial = local_ckpt / f".download-{tag}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        self.fs.get(f"{self.root}/{CHECKPOINTS}/{tag}/", str(partial), recursive=True)
        if not (partial / RUN_STATE).is_file():
            shutil.rmtree(partial, ignore_errors=True)
            raise FileNotFoundError(f"{self.url}/{CHECKPOINTS}/{tag}: named by {LATEST} but holds no {RUN_STATE}")
        shutil.rmtree(local_ckpt / tag, ignore_errors=True)  # a partial local copy of that same tag
        os.rename(partial, local_ckpt / tag)
        write_text(latest, tag)  # DeepSpeed's own marker, now that the tag is whole here
        log.info("--resume: downloaded %s/%s/%s into %s", self.url, CHECKPOINTS, tag, local_ckpt)


def fetch_final(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of a remote run's ``final/`` (for :func:`training.runs.load_run`): downloaded once
    into ``cache_dir`` (default: the URL's staging folder), through a temporary name."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    remote_final = root if root.endswith("/final") else f"{root}/final"
    local = Path(cache_dir) if cache_dir else default_staging_dir(url) / "fetched"
    target = local / "final"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if not fs.exists(f"{remote_final}/config.json"):
        raise FileNotFoundError(f"{url}: no final/config.json there (the run did not finish)")
    partial = local / f".final-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    fs.get(f"{remote_final}/", str(partial), recursive=True)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(partial, target)
    return target
