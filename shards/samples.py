"""Reading shard sets without torch: URL expansion, sample counts, skip records, tar reading and decoding.

The torch-free half of the reader: serving (Ray extraction, ONNX inference) reads shards through this
module, and ``shards.reader`` builds its DataLoaders on top of it. Only the standard library,
braceexpand, PIL and numpy are imported here (no webdataset, which imports torch); fsspec is imported
only when a spec is a URL (``https://``, ``s3://``, ``memory://``...).

Shards may live on local disk, behind any fsspec URL, or be the output of a ``pipe:`` command
(webdataset's convention); each kind is expanded, counted and read with the same guarantees
(docs/data-format.md, "Remote shards").

Every stage that can meet bad data (tar, image, json, map_fn) reports to one ``SkipLog`` and drops
only the affected sample, so one broken file never stops a long run.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import braceexpand
from PIL import Image

from shards.atomic import read_json
from shards.members import is_written_image_member as is_image_member
from shards.members import with_txt_caption

LOGGER = logging.getLogger("multiclip.shards")
SKIP_REASONS = ("corrupt_tar", "bad_image", "bad_json", "bad_txt", "map_error", "missing_image", "missing_json")
# The index ShardSetWriter writes beside the shards (shards.writer imports webdataset, so not from there).
SIZES_FILE = "sizes.json"
INCOMPLETE_FILE = "INCOMPLETE"  # present while (or because) a split's writing did not finish
WRITER_SHARD_NAME = re.compile(r"^shard-\d{6,}\.tar$")  # shards.writer.SHARD_PATTERN's names
STATS_SUFFIX = "_stats.json"  # img2dataset writes 00000_stats.json ({"successes": n, ...}) beside 00000.tar
PIPE_PREFIX = "pipe:"  # webdataset's convention: the rest of the url is a shell command writing the tar to stdout
_URL_SCHEME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*::)*[A-Za-z][A-Za-z0-9+.\-]*://")  # fsspec chains: a::b://
HTTP_CONNECT_TIMEOUT_S = 30.0  # no answer to a connection attempt within this: an error naming the URL
HTTP_READ_TIMEOUT_S = 120.0  # no byte of a shard for this long: an error naming the URL, never a hang
PIPE_EXIT_TIMEOUT_S = 10.0  # a pipe command still running this long after its output was closed is killed
TAR_READ_BUFFER = 1 << 20  # bytes per read of the tar stream (few round trips for remote shards)


class UnfinishedShardSet(ValueError):
    """A split whose writer never finished (killed, interrupted, failed): reading it would lose samples."""

MapFn = Callable[[dict[str, Any]], Any]


# --------------------------------------------------------------------------- where shards live


def is_pipe(url: str) -> bool:
    """A ``pipe:`` url: the shard is what the shell command after the prefix writes to stdout."""
    return url.startswith(PIPE_PREFIX)


def is_url(url: str) -> bool:
    """An fsspec URL (``scheme://...``: http, https, s3, gs, memory, file..., or a chained ``a::b://...``),
    read through fsspec; anything else is a local path."""
    return bool(_URL_SCHEME.match(url))


def shard_folder(url: str) -> str:
    """The folder a shard's sizes.json, ``_stats.json`` and ``INCOMPLETE`` marker sit in."""
    return url.rsplit("/", 1)[0] if is_url(url) else os.path.dirname(os.path.abspath(url))


def _url_filesystem(url: str):
    """fsspec's filesystem for a URL and the path within it; a clear error when fsspec (or the protocol's
    package, e.g. s3fs, gcsfs, aiohttp for http) is missing."""
    try:
        import fsspec
    except ImportError as err:
        raise ImportError(f"{url}: reading shards from URLs needs fsspec (pip install fsspec)") from err
    try:
        return fsspec.core.url_to_fs(url, **_fs_options(url))
    except ImportError as err:
        raise ImportError(f"{url}: {err}") from err


def _is_http(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


def _fs_options(url: str) -> dict[str, Any]:
    """HTTP: connect and read timeouts instead of aiohttp's 5-minute total (which would cut a long shard
    download and lets a stalled server hold a reader for minutes), and a response buffer of a whole tar
    read (aiohttp's 64 KiB default costs a trip through fsspec's event loop per 64 KiB)."""
    if not _is_http(url):
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_CONNECT_TIMEOUT_S, sock_read=HTTP_READ_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout, "read_bufsize": TAR_READ_BUFFER}}


def _read_url_bytes(url: str) -> bytes | None:
    """A small file beside remote shards (sizes.json, a stats file, the INCOMPLETE marker), None when it
    does not exist or the server refuses it (401/403: signed URLs, buckets without list permission); any
    other failure (a 500, no connection) raises, naming the URL."""
    fs, path = _url_filesystem(url)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, PermissionError):
        return None
    except Exception as err:  # aiohttp's ClientResponseError carries the status
        if getattr(err, "status", None) in (401, 403):
            return None
        raise


def _url_json(url: str, what: str) -> Any | None:
    """A JSON document behind a URL, None when absent; ValueError naming the URL when it is not JSON."""
    data = _read_url_bytes(url)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{url}: {what} is not valid JSON (torn by an interrupted write?): {err}") from None


def _json_beside(folder: str, name: str) -> tuple[str, Any] | None:
    """(where, document) of the JSON file ``name`` in a local folder or beside URLs; None when absent."""
    if is_url(folder):
        where = f"{folder}/{name}"
        document = _url_json(where, name)
        return None if document is None else (where, document)
    path = Path(folder) / name
    return (str(path), read_json(path, name)) if path.is_file() else None


# --------------------------------------------------------------------------- URL expansion and counting


def expand_urls(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Turn brace patterns, globs, directories, URLs and ``pipe:`` commands (or a list of them) into shard urls."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for one in specs:
        urls.extend(_expand_one(os.fspath(one)))
    for folder in sorted({shard_folder(u) for u in urls if not is_pipe(u)}):
        check_finished(folder)
    return urls


def check_finished(folder: str | Path) -> None:
    """Refuse a split with an ``INCOMPLETE`` marker (shards.writer leaves it until the set is whole)."""
    folder = os.fspath(folder)
    if is_url(folder):
        data = _read_url_bytes(f"{folder}/{INCOMPLETE_FILE}")
        why = None if data is None else data.decode("utf-8", errors="replace").strip()
    else:
        marker = Path(folder) / INCOMPLETE_FILE
        why = marker.read_text(encoding="utf-8", errors="replace").strip() if marker.is_file() else None
    if why is not None:
        raise UnfinishedShardSet(f"{folder}: an unfinished shard set ({INCOMPLETE_FILE}: {why}); run the conversion "
                                 "again (with --overwrite) before reading it")


def _has_glob(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def _expand_one(spec: str) -> list[str]:
    """One spec to files; raises FileNotFoundError naming the spec (and missing files) when nothing fits."""
    if is_pipe(spec):
        return list(braceexpand.braceexpand(spec))  # commands cannot be listed: a failing one is a counted skip
    if is_url(spec):
        return _expand_url(spec)
    if os.path.isdir(spec):
        return _expand_directory(spec)
    if "{" in spec:
        return _expand_braces(spec)
    if _has_glob(spec):
        return _expand_glob(spec)
    if os.path.isfile(spec):
        return [spec]
    raise FileNotFoundError(f"shard spec {spec!r} matches no file")


def _expand_directory(spec: str) -> list[str]:
    """The shards of a folder: every ``*.tar``, or, where a sizes.json indexes the folder, the shards it lists.

    With a sizes.json (``shards.writer`` writes one beside its ``shard-NNNNNN.tar``), a listed shard that is
    missing is an error naming it, and an unlisted ``*.tar`` is only read when it is named like the
    writer's shards (a shard whose count the index lacks: counted by reading). Any other ``*.tar`` (a
    backup, a source archive) is not a shard of the set: it is left out, and a warning names it.
    """
    check_finished(spec)
    found = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    sizes = _read_sizes(spec)
    if sizes is None:
        if not found:
            raise FileNotFoundError(f"shard directory {spec!r} holds no *.tar file")
        return found
    missing = [name for name in sorted(sizes) if not os.path.isfile(os.path.join(spec, name))]
    if missing:
        raise FileNotFoundError(f"shard directory {spec!r}: {len(missing)} shard(s) listed in {SIZES_FILE} missing: "
                                f"{_shown(missing)}")
    unlisted = [os.path.basename(u) for u in found if os.path.basename(u) not in sizes]
    extra = [name for name in unlisted if WRITER_SHARD_NAME.match(name)]
    foreign = [name for name in unlisted if not WRITER_SHARD_NAME.match(name)]
    if foreign:
        _warn_once(spec, "not read: not listed in its " + SIZES_FILE + " and not named like a shard (shard-NNNNNN.tar)",
                   foreign)
    if extra:
        _warn_once(spec, "read although not listed in its " + SIZES_FILE + " (samples counted by reading)", extra)
    urls = sorted(os.path.join(spec, name) for name in [*sizes, *extra])
    if not urls:
        raise FileNotFoundError(f"shard directory {spec!r} holds no shard ({SIZES_FILE} lists none)")
    return urls


_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()


def _warn_once(folder: str, what: str, names: list[str]) -> None:
    """One warning per process for a folder's odd files (expand_urls runs several times per run)."""
    seen = (os.path.abspath(folder), what, tuple(names))
    if seen not in _WARNED:
        _WARNED.add(seen)
        LOGGER.warning("shard directory %s: %d file(s) %s: %s", folder, len(names), what, _shown(names))


def _shown(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _expand_glob(spec: str) -> list[str]:
    urls = sorted(path for path in glob.glob(spec) if os.path.isfile(path))
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
    return urls


def _expand_url(spec: str) -> list[str]:
    """A URL spec: a brace pattern (each URL as named: not probed, a missing one is a counted skip naming it),
    a glob (fsspec's; over HTTP only ``*``, since ``?`` starts a query string), a folder (ends with ``/``:
    the shards its sizes.json lists, else its ``*.tar``) or one shard."""
    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if spec.endswith("/"):
        return _expand_url_folder(spec.rstrip("/"))
    if ("*" in spec) if _is_http(spec) else _has_glob(spec):
        return _glob_url(spec)
    return [spec]


def _glob_url(spec: str) -> list[str]:
    fs, path = _url_filesystem(spec)
    urls = sorted(_as_url(fs, found) for found in fs.glob(path))
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
    return urls


def _as_url(fs, path: str) -> str:
    """fsspec's glob gives paths without the protocol (HTTP gives whole URLs): make them URLs again."""
    return path if is_url(path) else fs.unstrip_protocol(path)


def _expand_url_folder(folder: str) -> list[str]:
    """The shards of a folder behind a URL: those its sizes.json lists, or (none there) its ``*.tar``."""
    check_finished(folder)
    sizes = _read_sizes(folder)
    if sizes is not None:
        if not sizes:
            raise FileNotFoundError(f"shard folder {folder + '/'!r} holds no shard ({SIZES_FILE} lists none)")
        return sorted(f"{folder}/{name}" for name in sizes)
    try:
        return _glob_url(f"{folder}/*.tar")
    except FileNotFoundError:
        raise FileNotFoundError(f"shard folder {folder + '/'!r}: no {SIZES_FILE} and no *.tar listed there (over "
                                "HTTP, name the shards with a brace pattern)") from None


def _expand_braces(spec: str) -> list[str]:
    """Brace patterns name exact files, so every expanded name must exist (globs inside may match several)."""
    urls: list[str] = []
    missing: list[str] = []
    for name in braceexpand.braceexpand(spec):
        found = sorted(glob.glob(name)) if _has_glob(name) else ([name] if os.path.isfile(name) else [])
        urls.extend(found)
        if not found:
            missing.append(name)
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise FileNotFoundError(f"shard pattern {spec!r}: {len(missing)} expanded file(s) missing: {shown}")
    return urls


def load_sizes(directory: str | Path) -> dict[str, int]:
    """Samples per shard basename from a directory's sizes.json; empty when there is none.

    Raises ValueError naming the file when it is torn (not JSON) or its ``shards`` entries are not shard
    names with sample counts; a sizes.json of another layout (no ``shards`` object) is ignored, with a warning.
    """
    return _read_sizes(directory) or {}


def _read_sizes(directory: str | Path) -> dict[str, int] | None:
    """The ``shards`` of a directory's sizes.json, None when it has none; ValueError naming a bad one."""
    fix = (f"write the shard set again (its converter with --overwrite), or delete {SIZES_FILE} to read every "
           "*.tar of the folder, counted by reading")
    try:
        found = _json_beside(os.fspath(directory), SIZES_FILE)
    except ValueError as err:
        raise ValueError(f"{err}; {fix}") from None
    if found is None:
        return None
    path, document = found
    shards = document.get("shards") if isinstance(document, dict) else None
    if not isinstance(shards, dict):  # another tool's file (open_clip's is a flat mapping): not this index
        _warn_once(str(directory), 'ignored: not the index shards.writer writes (no "shards" object)', [SIZES_FILE])
        return None
    sizes: dict[str, int] = {}
    for name, count in shards.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{path}: {SIZES_FILE} gives shard {name!r} the count {count!r}, not a sample count; {fix}")
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"{path}: {SIZES_FILE} lists {name!r}, not a file name in this folder; {fix}")
        sizes[name] = count
    return sizes


def stats_count(folder: str, name: str) -> int | None:
    """Samples in shard ``name`` by img2dataset's ``<stem>_stats.json`` beside it (its ``successes``: the
    tar holds only the images that downloaded and resized), None when there is none.

    Raises ValueError naming the file when ``successes`` is not a sample count.
    """
    if not name.endswith(".tar"):
        return None
    found = _json_beside(folder, name[: -len(".tar")] + STATS_SUFFIX)
    if found is None:
        return None
    where, document = found
    count = document.get("successes") if isinstance(document, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{where}: img2dataset stats without a sample count: \"successes\" is {count!r}; "
                         f"delete the file to count {name} by reading")
    return count


class ShardSizes:
    """Sample counts of shards: from each folder's sizes.json (read once), else img2dataset's ``_stats.json``.

    ``pipe:`` shards have no folder: they are never listed (counted by reading).
    """

    def __init__(self) -> None:
        self._by_dir: dict[str, dict[str, int] | None] = {}

    def listed(self, url: str) -> int | None:
        """The count sizes.json (or the shard's ``_stats.json``) gives for this shard, None when neither does."""
        if is_pipe(url):
            return None
        directory, name = (url.rsplit("/", 1) if is_url(url) else (os.path.dirname(url) or ".", os.path.basename(url)))
        if directory not in self._by_dir:
            self._by_dir[directory] = _read_sizes(directory)
        sizes = self._by_dir[directory]
        return sizes.get(name) if sizes is not None else stats_count(directory, name)


def count_samples(urls: str | list[str]) -> int:
    """Total samples in the shards, from sizes.json (or img2dataset's ``_stats.json``) where listed, else by
    reading the shard (``pipe:`` shards always: their command runs once more)."""
    sizes = ShardSizes()
    total = 0
    for url in expand_urls(urls):
        listed = sizes.listed(url)
        total += listed if listed is not None else count_by_reading(url)
    return total


def count_by_reading(url: str) -> int:
    """Slow path for unindexed shards: count the samples that can be read."""
    return sum(1 for _ in read_shard(url, SkipLog()))


# --------------------------------------------------------------------------- skip records


class SkipLog:
    """Records skipped samples as warnings and, given a directory, as JSON lines in one file per rank/worker."""

    def __init__(self, error_log_dir: str | Path | None = None, rank: int = 0, worker: int = 0):
        self.path = skip_log_path(error_log_dir, rank, worker) if error_log_dir is not None else None
        self.count = 0

    def record(self, shard: str, key: str | None, reason: str, error: BaseException | str) -> None:
        """Report one skipped sample (key None when the failure is not tied to one sample)."""
        text = str(error) or type(error).__name__  # a read timeout's message is empty: its type says it
        entry = {"shard": shard, "key": key, "reason": reason, "error": text}
        self.count += 1
        LOGGER.warning("skipped sample: shard=%s key=%s reason=%s error=%s", shard, key, reason, entry["error"])
        if self.path is not None:
            self._append(entry)

    def _append(self, entry: dict[str, Any]) -> None:
        """Open per write so a crash loses at most the current line and no handle stays open in workers."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()


def skip_log_path(error_log_dir: str | Path, rank: int, worker: int) -> Path:
    """Each worker process owns its file, so concurrent writers never interleave."""
    return Path(error_log_dir) / f"skipped-rank{rank}-worker{worker}.jsonl"


def read_skip_logs(error_log_dir: str | Path) -> list[dict[str, Any]]:
    """All skip records under a directory (every rank and worker), ignoring torn lines."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(error_log_dir).glob("skipped-rank*-worker*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def summarize_skips(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per reason, for a one-line report at the end of a run."""
    by_reason: dict[str, int] = {}
    for record in records:
        reason = str(record.get("reason"))
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"count": len(records), "by_reason": dict(sorted(by_reason.items()))}


# --------------------------------------------------------------------------- tar reading

# WebDataset's member naming: the key is the path up to the first dot of the file name, the rest is the
# member's extension (``dir/a0001.0.png`` is member ``0.png`` of sample ``dir/a0001``).
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^.]+)\.([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # ``__index__`` and the like: archive metadata, not samples


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a tar member, or None for a name without an extension."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


class PipeStream:
    """The stdout of a ``pipe:`` shard's command, whose exit status is checked: a command that fails (at any
    point) is an OSError naming the url, its status and the end of its stderr, never a silently short shard.

    Leaving the block with an exception (a corrupt tar, the reader stopping early) stops the command without
    judging it: it then dies of SIGPIPE or is killed.
    """

    def __init__(self, url: str):
        self.url = url
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(url[len(PIPE_PREFIX):], shell=True, stdout=subprocess.PIPE,
                                      stderr=self._stderr, stdin=subprocess.DEVNULL)

    def read(self, size: int = -1) -> bytes:
        data = self._proc.stdout.read(size)
        if not data:  # end of output: the command must have succeeded for the shard to be whole
            self._check(self._wait(), allowed=(0,))
        return data

    def close(self, check: bool = True) -> None:
        if self._proc.stdout.closed:
            return
        self._proc.stdout.close()  # a command still writing gets SIGPIPE
        status = self._wait()
        try:
            if check:  # status 141 (-13): it died of SIGPIPE because the tar ended before its output did
                self._check(status, allowed=(0, 141, -13))
        finally:
            self._stderr.close()

    def _wait(self) -> int:
        try:
            return self._proc.wait(timeout=PIPE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def _check(self, status: int, allowed: tuple[int, ...]) -> None:
        if status not in allowed:
            raise OSError(f"{self.url}: the command exited with status {status}: {self._stderr_tail()}")

    def _stderr_tail(self, limit: int = 500) -> str:
        if self._stderr.closed:
            return "(stderr closed)"
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace").strip()
        return (text[-limit:] if text else "(no stderr)").replace("\n", " | ")

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)


def _open_error(url: str, err: BaseException) -> OSError:
    """An fsspec opening error as an OSError that names the URL and says what happened (fsspec's 404 is a
    FileNotFoundError whose message is the bare URL; aiohttp's status errors carry ``status``)."""
    if isinstance(err, FileNotFoundError):
        return FileNotFoundError(f"{url}: not found (HTTP 404, or no such object)")
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return OSError(f"{url}: HTTP {status} {getattr(err, 'message', '')}".rstrip())
    return OSError(f"{url}: cannot open: {type(err).__name__}: {err}")


def _http_stream(fs, url: str) -> BinaryIO:
    """One streamed GET through fsspec's HTTPStreamFile, without the HEAD request ``fs.open`` sends first
    for a size a stream does not need (a round trip per shard, and it turns every failure, a 500 or a
    refused connection, into a bare FileNotFoundError)."""
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    session = sync(fs.loop, fs.set_session)
    return HTTPStreamFile(fs, url, mode="rb", loop=fs.loop, session=session, **fs.kwargs)


def open_shard(url: str) -> BinaryIO:
    """A shard's bytes as a stream: a local file, a ``pipe:`` command's stdout, or an fsspec URL (HTTP streamed
    in one request, without range requests). Opening errors name the url."""
    if is_pipe(url):
        return PipeStream(url)  # type: ignore[return-value]
    if not is_url(url):
        return open(url, "rb")
    fs, path = _url_filesystem(url)
    try:
        return _http_stream(fs, path) if _is_http(url) else fs.open(path, "rb")
    except Exception as err:  # aiohttp's ClientResponseError, FileNotFoundError for a 404, socket errors...
        raise _open_error(url, err) from err


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular, non-metadata members, in archive order, streaming through the shard."""
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*", bufsize=TAR_READ_BUFFER) as tar:
        for info in tar:
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # a streaming TarFile otherwise keeps every header of a large shard
            yield info.name, data


def tar_samples(url: str, failures: list[BaseException]) -> Iterator[dict[str, Any]]:
    """Consecutive members with one key form a sample: ``{"__key__", "__url__", ext: bytes, ...}``.

    A read error (or a repeated member) is appended to ``failures`` and ends the shard; the sample
    being assembled at that moment is still yielded, so the caller can name it in the skip log.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in tar_members(url):
            split = split_member_name(name)
            if split is None:
                continue
            key, ext = split
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise ValueError(f"{name}: duplicate member {ext!r} in sample {key!r}")
            current[ext] = data
    except Exception as exc:  # tarfile raises ReadError, EOFError, OSError, zlib/lzma errors...
        failures.append(exc)
    if current is not None:
        yield current


def read_shard(url: str, skip_log: SkipLog, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard; a tar error drops the sample being read and ends the shard, keeping the rest.

    With ``expected`` (from sizes.json or a ``_stats.json``), a shard that ends early without an error (a tar cut inside a
    header looks like a normal end to tarfile) is reported too.
    """
    failures: list[BaseException] = []
    seen = 0
    unfinished_reported = False
    for sample in tar_samples(url, failures):
        seen += 1
        if failures:
            skip_log.record(url, sample.get("__key__"), "corrupt_tar", failures[0])
            unfinished_reported = True
            continue
        yield sample
    if failures and not unfinished_reported:
        skip_log.record(url, None, "corrupt_tar", failures[0])
    if expected is not None and seen < expected:
        skip_log.record(url, None, "corrupt_tar", f"read {seen} of the {expected} samples its index lists "
                                                   f"({SIZES_FILE}, or img2dataset's {STATS_SUFFIX})")


def read_shards(shards: Iterable[dict[str, str]], skip_log: SkipLog) -> Iterator[dict[str, Any]]:
    """Raw samples of each shard in turn, checked against sizes.json (or ``_stats.json``) where it is listed."""
    sizes = ShardSizes()
    for shard in shards:
        yield from read_shard(shard["url"], skip_log, sizes.listed(shard["url"]))


# --------------------------------------------------------------------------- decoding


class SampleError(Exception):
    """A sample that cannot be used, with the skip reason the log should show."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


DRAFT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg can apply while decoding (PIL's Image.draft)


def draft_scale(width: int, height: int, min_side: int | None) -> int:
    """The largest JPEG draft reduction (8, 4, 2 or 1) whose image keeps a shorter side >= ``min_side``.

    libjpeg decodes at 1/s scale to ``ceil(width / s) x ceil(height / s)``; an image already too small
    for ``min_side`` is decoded at full size (draft never upscales, and never shrinks below the need).
    """
    if not min_side:
        return 1
    short = min(width, height)
    return next((s for s in DRAFT_SCALES if -(-short // s) >= min_side), 1)


MAX_ASPECT_RATIO = 20  # long side / short side: beyond it, resizing the short side explodes the long one
MAX_PIXELS = 64_000_000  # decoded width x height


def image_shape_problem(width: int, height: int) -> str | None:
    """Why an image of this size is not worth decoding and resizing (bounded work per image), or None.

    A 370-byte 1 x 100000 PNG is cheap to decode, but resizing its short side to the model's 224 px would
    make its long side 22 million pixels (gigabytes): such images are skipped, named, before any work.
    """
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"aspect ratio {max(width, height) / min(width, height):.0f}:1 over {MAX_ASPECT_RATIO}:1 ({width}x{height})"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} is over {MAX_PIXELS:,} pixels"
    return None


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Fully decode (so truncated files fail here, not in map_fn) to RGB.

    With ``min_side`` a JPEG is decoded in draft mode, straight to the smallest 1/2, 1/4 or 1/8 scale
    whose shorter side is still >= ``min_side`` (:func:`draft_scale`): up to 64x fewer pixels to decode
    and resize. Other formats, and JPEGs too small to reduce, are decoded at full size.
    """
    with Image.open(io.BytesIO(data)) as img:
        problem = image_shape_problem(img.width, img.height)  # from the header: before decoding
        if problem:
            raise ValueError(problem)
        if min_side and img.format == "JPEG":
            scale = draft_scale(img.width, img.height, min_side)
            if scale > 1:  # PIL picks scale s for a request of (width // s, height // s)
                img.draft("RGB", (img.width // scale, img.height // scale))
        return img.convert("RGB")


def decode_json(data: bytes) -> dict[str, Any]:
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, not an object")
    return meta


def decode_sample(sample: dict[str, Any], decode_size: int | None = None) -> dict[str, Any]:
    """Images to PIL RGB (JPEGs draft-decoded to shorter side >= ``decode_size``) and json to a dict, whose
    ``caption`` comes from the ``txt`` member when the json has none (img2dataset's layout).

    Raises SampleError with the skip reason.
    """
    image_names = [name for name in sample if is_image_member(name)]
    if not image_names:
        raise SampleError("missing_image", f"no image member among {sorted(sample)}")
    if "json" not in sample:
        raise SampleError("missing_json", f"no json member among {sorted(sample)}")
    decoded = dict(sample)
    try:
        meta = decode_json(sample["json"])
    except ValueError as exc:
        raise SampleError("bad_json", str(exc)) from exc
    try:
        decoded["json"] = with_txt_caption(meta, sample)
    except UnicodeDecodeError as exc:
        raise SampleError("bad_txt", f"txt member (the caption) is not UTF-8 text: {exc}") from exc
    for name in image_names:
        try:
            decoded[name] = decode_image(sample[name], decode_size)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise SampleError("bad_image", f"{name}: {exc}") from exc
    return decoded


def decode_samples(samples: Iterable[dict[str, Any]], skip_log: SkipLog,
                   decode_size: int | None = None) -> Iterator[dict[str, Any]]:
    for sample in samples:
        try:
            yield decode_sample(sample, decode_size)
        except SampleError as exc:
            skip_log.record(sample.get("__url__", "?"), sample.get("__key__"), exc.reason, exc)


def map_samples(samples: Iterable[dict[str, Any]], map_fn: MapFn, skip_log: SkipLog) -> Iterator[Any]:
    for sample in samples:
        try:
            yield map_fn(sample)
        except Exception as exc:  # any failure of user code only costs this sample
            skip_log.record(sample.get("__url__", "?"), sample.get("__key__"), "map_error", repr(exc))


# --------------------------------------------------------------------------- shard assignment


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of one epoch; depends only on (seed, epoch), so all ranks agree without talking."""
    ordered = list(urls)
    random.Random(stable_seed("shards", seed, epoch)).shuffle(ordered)
    return ordered


def resampled_shards(urls: list[str], count: int, seed: int, epoch: int, rank: int, worker: int) -> list[str]:
    """Shards drawn with replacement; each rank/worker has its own stream so they do not read in lockstep."""
    rng = random.Random(stable_seed("resample", seed, epoch, rank, worker))
    return [rng.choice(urls) for _ in range(count)]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int, resample: bool) -> None:
    """Without resampling every rank/worker needs its own shard; an idle one would hang collectives."""
    readers = world_size * max(1, num_workers)
    if not resample and num_shards < readers:
        raise ValueError(
            f"{num_shards} shard(s) cannot be split over {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"= {readers} readers; write at least {readers} shards (smaller shard size) or set resample: true"
        )


__all__ = [
    "INCOMPLETE_FILE",
    "PIPE_PREFIX",
    "PipeStream",
    "STATS_SUFFIX",
    "is_pipe",
    "is_url",
    "open_shard",
    "shard_folder",
    "stats_count",
    "SIZES_FILE",
    "UnfinishedShardSet",
    "check_finished",
    "SKIP_REASONS",
    "SampleError",
    "ShardSizes",
    "SkipLog",
    "check_enough_shards",
    "count_by_reading",
    "count_samples",
    "decode_image",
    "decode_json",
    "decode_sample",
    "decode_samples",
    "draft_scale",
    "epoch_shard_order",
    "expand_urls",
    "load_sizes",
    "map_samples",
    "read_shard",
    "read_shards",
    "read_skip_logs",
    "resampled_shards",
    "skip_log_path",
    "split_member_name",
    "stable_seed",
    "summarize_skips",
]
