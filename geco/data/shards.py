"""Committed WebDataset shards, their index files, the versioned manifest and the failures table.

Layout under one output URI (a local directory or an ``s3://bucket/prefix``)::

    shard-000000.tar        WebDataset tar: members ``<key>.<member>``, samples contiguous
    shard-000000.json       its index: keys, per-key content hash and split, byte size, sha256
    ...
    manifest/v000001.json   every committed shard so far + config/source hashes + failures summary
    manifest/v000002.json   (append-only: a new version lists the old shards and the new ones)
    failures/v000001.jsonl  one JSON line per object that failed in that run

Commit protocol (what makes crashes and re-runs safe):

* A shard is streamed through :func:`geco.storage.atomic_writer`, so ``shard-N.tar`` becomes
  visible only when whole. Its index ``shard-N.json`` is written (also atomically) only *after*
  the tar is committed: **an index file present => its shard is complete**. A tar without an
  index (a crash between the two writes) is an *orphan*: it is ignored, and its name is never
  reused.
* Committed shards are **immutable**: a writer refuses to open a shard name that exists (tar or
  index). New or re-rendered objects go to new shards with higher indices; for a key present in
  several shards the one in the highest-numbered shard is current, the others are *superseded*
  (the manifest lists them; :mod:`geco.data.loader` skips them).
* Each shard holds samples of **one split** (train or val), so a training job can read just the
  train shards (e.g. with ``ray.data.read_webdataset``) without filtering.
* The index files are the source of truth: :func:`committed_state` rebuilds ``{key:
  content_hash}`` and the next free shard index from them even when no manifest was written.
* The train/val split of an object is :func:`split_for` (a stable hash of its key), so it never
  changes when objects are added.

Temporaries of killed writers: a driver killed while a shard is open leaves its temporary
(locally ``.shard-NNNNNN.tar.tmp-<random>-<pid>@<host>``, on S3 an incomplete multipart upload,
invisible but billed). :func:`clean_stale_temporaries` removes them on the next run when their
writer is dead: on this host, its pid is gone; elsewhere (or with no pid in the name), the file
was last written longer ago than ``max_age_s`` (S3: the upload was initiated that long ago). A
live writer on this host is never touched; one on another host only once it has written nothing
for ``max_age_s``, so keep that longer than any pause of a writer (``dataset.stale_temp_hours``).
Caveat: two containers sharing one hostname but not a pid namespace look like one host.

One run's writes (:class:`DatasetRun`): the render stage and the pseudo-GT stage write their
datasets the same way. A run cleans the temporaries of killed writers, reads what is committed
(the index files) and the failures so far, decides what to compute (:func:`plan`), adds samples through a
:class:`ShardWriter` (split by :func:`split_for`), records failures, and at the end writes a new
manifest version and failures version **only when something changed** (new shards, new failures,
another source list or settings hash), so a re-run with nothing to do writes nothing.

Tar bytes are reproducible: members are written in sorted order with fixed mtime/uid/gid/mode
in the ustar format, so the same samples in the same order give byte-identical shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Self

from geco import storage
from geco.data.schema import SampleError, sanitize_object_id

__all__ = [
    "DatasetRun",
    "ShardExistsError",
    "ShardWriter",
    "clean_stale_temporaries",
    "committed_state",
    "current_samples",
    "index_uri",
    "is_retryable",
    "list_manifest_versions",
    "plan",
    "read_failures",
    "read_latest_manifest",
    "read_manifest",
    "shard_name",
    "shard_uri",
    "split_for",
    "summarize_failures",
    "write_failures",
    "write_manifest_version",
]

SPLITS = ("train", "val")
INDEX_FORMAT = "geco-shard-index/1"
MANIFEST_FORMAT = "geco-shard-manifest/1"
MANIFEST_DIR = "manifest"
FAILURES_DIR = "failures"
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so shard bytes are reproducible
_SHARD_RE = re.compile(r"shard-(\d{6})\.(tar|json)")
_VERSION_RE = re.compile(r"v(\d{6})\.(json|jsonl)")
# geco.storage.atomic_writer's local temporaries: .<name>.tmp-<random8>[-<pid>@<host>]
_TEMP_RE = re.compile(r"\..+\.tmp-[0-9a-f]{8}(?:-(?P<pid>\d+)@(?P<host>[A-Za-z0-9.\-]+))?")


class ShardExistsError(FileExistsError):
    """A shard (or its index) with this name is already committed; shards are immutable."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def shard_name(index: int) -> str:
    if not 0 <= index <= 999_999:
        raise ValueError(f"shard index must be in [0, 999999], got {index}")
    return f"shard-{index:06d}.tar"


def shard_uri(output: str, index: int) -> str:
    return storage.join(output, shard_name(index))


def index_uri(output: str, index: int) -> str:
    return storage.join(output, shard_name(index)[: -len(".tar")] + ".json")


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------
def split_for(object_id: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of ids, else ``"train"``.

    Decided by SHA-256 of the id alone, so an object's split never changes when objects are
    added or removed, on any machine. Pass the sanitized key (the sample's ``__key__``).
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    h = int.from_bytes(hashlib.sha256(b"geco-split\x00" + object_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
class _HashingWriter:
    """Write-through wrapper that counts bytes and hashes them (sha256)."""

    def __init__(self, f: IO[bytes]):
        self._f, self.size, self._h = f, 0, hashlib.sha256()

    def write(self, b) -> int:
        if self._f is None:  # discarded: the shard is being aborted
            return len(b)
        self._f.write(b)
        self._h.update(b)
        self.size += len(b)
        return len(b)

    def discard(self) -> None:
        self._f = None

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _OpenShard:
    def __init__(self, output: str, index: int, split: str):
        self.index, self.split = index, split
        self.uri, self.index_uri = shard_uri(output, index), index_uri(output, index)
        if storage.exists(self.uri) or storage.exists(self.index_uri):
            raise ShardExistsError(f"{self.uri} is already committed; committed shards are immutable "
                                   "(start a writer at committed_state(output)['next_index'])")
        self._cm = storage.atomic_writer(self.uri)
        self._file = _HashingWriter(self._cm.__enter__())
        self.tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.samples: list[dict] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> dict:
        self.tar.close()  # end-of-archive blocks; leaves the underlying file open
        if storage.exists(self.uri) or storage.exists(self.index_uri):
            raise ShardExistsError(f"{self.uri} appeared while it was being written; not overwriting it")
        self._cm.__exit__(None, None, None)  # the tar is now visible, whole
        index = {
            "format": INDEX_FORMAT,
            "shard": shard_name(self.index),
            "index": self.index,
            "split": self.split,
            "count": len(self.samples),
            "bytes": self._file.size,
            "sha256": self._file.hexdigest(),
            "created": _now(),
            "samples": self.samples,
        }
        storage.write_text(self.index_uri, json.dumps(index, indent=1, sort_keys=True) + "\n")
        return index

    def abort(self, exc: BaseException | None = None) -> None:
        err = exc or RuntimeError("shard aborted")
        self._file.discard()
        # the original error is what matters: cleanup errors are not raised over it
        with contextlib.suppress(Exception):
            self.tar.close()  # releases the tar stream without touching the (aborted) file
        with contextlib.suppress(Exception):
            self._cm.__exit__(type(err), err, err.__traceback__)  # removes the temporary file


class ShardWriter:
    """Write samples into committed, immutable WebDataset shards under ``output``.

    One shard is open per split (train / val); a shard is committed (tar, then its index) when
    it holds ``samples_per_shard`` samples, and :meth:`flush` / :meth:`close` commit partial ones.
    Shard indices are handed out in the order shards are *opened*: ``start_index``,
    ``start_index + index_step``, ... (parallel writers can use disjoint strides: writer k of n
    uses ``start_index=base + k, index_step=n``).

    Use it as a context manager: leaving the block with an exception discards the open shards
    (nothing partial becomes visible); leaving it normally commits them::

        state = committed_state(out)
        with ShardWriter(out, 64, state["next_index"]) as w:
            w.add(sample, content_hash, split_for(sample["__key__"], 0.02))
        w.committed  # the index dicts of the shards this writer committed
    """

    def __init__(self, output_uri: str, samples_per_shard: int, start_index: int = 0, index_step: int = 1):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if start_index < 0 or index_step < 1:
            raise ValueError(f"need start_index >= 0 and index_step >= 1, got {start_index}, {index_step}")
        self.output = str(output_uri).rstrip("/")
        self.samples_per_shard = samples_per_shard
        self._next_index = start_index
        self._step = index_step
        self._open: dict[str, _OpenShard] = {}
        self._keys: set[str] = set()
        self.committed: list[dict] = []
        self._closed = False

    # -- public ---------------------------------------------------------------------------
    def add(self, sample: Mapping[str, Any], content_hash: str, split: str = "train",
            object_id: str | None = None) -> None:
        """Append one sample (``{"__key__": key, member: bytes, ...}``) to the open shard of
        ``split``; commits that shard when it is full. The sample is checked before any byte is
        written, so a rejected sample leaves the open shard intact."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        key, members = self._check(sample)
        if key in self._keys:
            raise ValueError(f"key {key!r} was already added to this writer")
        shard = self._open.get(split)
        if shard is None:
            shard = _OpenShard(self.output, self._next_index, split)
            self._next_index += self._step
            self._open[split] = shard
        try:
            shard.add(key, members)
        except BaseException as e:  # a half-written sample: this shard can't be committed
            self._open.pop(split).abort(e)
            raise
        self._keys.add(key)
        entry = {"key": key, "content_hash": str(content_hash), "split": split}
        if object_id is not None and object_id != key:
            entry["object_id"] = object_id
        shard.samples.append(entry)
        if len(shard.samples) >= self.samples_per_shard:
            self._commit(split)

    def flush(self) -> list[dict]:
        """Commit every open (partial) shard; returns their index dicts."""
        out = []
        for split in sorted(self._open):
            out.append(self._commit(split))
        return out

    def close(self) -> list[dict]:
        """Flush and close; returns the index dicts of all shards this writer committed."""
        if not self._closed:
            self.flush()
            self._closed = True
        return self.committed

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard every open shard (nothing of them becomes visible) and close."""
        for split in list(self._open):
            self._open.pop(split).abort(exc)
        self._closed = True

    @property
    def next_index(self) -> int:
        return self._next_index

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

    def __del__(self):  # a writer dropped without close() must not leave temp files behind
        if getattr(self, "_open", None):
            self.abort()

    # -- internals ------------------------------------------------------------------------
    def _commit(self, split: str) -> dict:
        shard = self._open.pop(split)
        try:
            index = shard.commit()
        except BaseException as e:
            shard.abort(e)
            raise
        self.committed.append(index)
        return index

    @staticmethod
    def _check(sample: Mapping[str, Any]) -> tuple[str, list[tuple[str, bytes]]]:
        key = sample.get("__key__")
        if not isinstance(key, str) or sanitize_object_id(key) != key:
            raise SampleError(f"sample key {key!r} is not a sanitized object id (use sanitize_object_id)")
        members = []
        for name in sorted(k for k in sample if not k.startswith("__")):
            data = sample[name]
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            if not isinstance(data, bytes):
                raise SampleError(f"sample {key!r}: member {name} is {type(data).__name__}, not bytes")
            full = f"{key}.{name}"
            if len(full.encode()) > 100:
                raise SampleError(f"sample {key!r}: tar member name {full!r} is longer than 100 bytes")
            if name != name.lower() or "/" in name:
                raise SampleError(f"sample {key!r}: member name {name!r} must be lower-case, without '/'")
            members.append((name, data))
        if not members:
            raise SampleError(f"sample {key!r} has no members")
        return key, members


# --------------------------------------------------------------------------------------------
# committed state (source of truth: the index files)
# --------------------------------------------------------------------------------------------
def _shard_files(output: str) -> dict[str, dict[int, str]]:
    """{"tar": {index: uri}, "json": {index: uri}} for shard files directly under ``output``."""
    output = str(output).rstrip("/")
    out: dict[str, dict[int, str]] = {"tar": {}, "json": {}}
    for uri in storage.listdir(output):
        rel = uri[len(output) + 1:]
        m = _SHARD_RE.fullmatch(rel)
        if m:
            out[m.group(2)][int(m.group(1))] = uri
    return out


def committed_state(output: str) -> dict[str, Any]:
    """What is committed under ``output``, from the shard index files alone.

    Returns ``{"objects": {key: content_hash}, "location": {key: shard name}, "shards": [index
    dicts, by index], "next_index": first index above every shard or index file, "orphans":
    [tar names without an index]}``. For a key in several shards the highest-numbered shard
    wins. Works after a crash even if no manifest was written.
    """
    files = _shard_files(output)
    shards = []
    for i in sorted(files["json"]):
        index = json.loads(storage.read_text(files["json"][i]))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{files['json'][i]}: not a shard index ({index.get('format')!r})")
        shards.append(index)
    objects: dict[str, str] = {}
    location: dict[str, str] = {}
    for index in shards:
        for s in index["samples"]:
            objects[s["key"]] = s["content_hash"]
            location[s["key"]] = index["shard"]
    used = set(files["tar"]) | set(files["json"])
    return {
        "objects": objects,
        "location": location,
        "shards": shards,
        "next_index": max(used) + 1 if used else 0,
        "orphans": [shard_name(i) for i in sorted(set(files["tar"]) - set(files["json"]))],
    }


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def list_manifest_versions(output: str) -> list[int]:
    base = storage.join(output, MANIFEST_DIR)
    out = []
    for uri in storage.listdir(base, suffix=".json"):
        m = _VERSION_RE.fullmatch(uri[len(base) + 1:])
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def manifest_uri(output: str, version: int) -> str:
    return storage.join(output, MANIFEST_DIR, f"v{version:06d}.json")


def read_manifest(output: str, version: int) -> dict:
    return json.loads(storage.read_text(manifest_uri(output, version)))


def read_latest_manifest(output: str) -> dict | None:
    """The highest-numbered manifest version, or ``None`` when none was written yet."""
    versions = list_manifest_versions(output)
    return read_manifest(output, versions[-1]) if versions else None


def summarize_failures(rows: Iterable[Mapping[str, Any]], top: int = 10) -> dict:
    rows = list(rows)
    reasons = Counter(str(r.get("reason", "")).strip().splitlines()[0][:200] if r.get("reason") else "unknown"
                      for r in rows)
    return {"count": len(rows), "top_reasons": [{"reason": k, "count": v} for k, v in reasons.most_common(top)]}


def write_manifest_version(output: str, *, settings_hash: str, source_list_hash: str,
                           config: Mapping[str, Any] | None = None,
                           failures: Iterable[Mapping] | Mapping | None = None,
                           extra: Mapping[str, Any] | None = None,
                           state: Mapping[str, Any] | None = None) -> str:
    """Write the next manifest version (``manifest/vNNNNNN.json``) and return its URI.

    Lists every committed shard (from the index files, or ``state`` from
    :func:`committed_state`) with its counts and its samples (key, content hash, split) and the
    keys superseded by later shards; records ``settings_hash`` (the render settings / config
    hash), ``source_list_hash``, the creation time, an optional ``config`` dict (stored as is), a
    failures summary (``failures`` may be rows, which are summarized, or a ready summary dict)
    and ``extra`` (merged at the top level). Never overwrites an existing version.
    """
    state = dict(state) if state is not None else committed_state(output)
    versions = list_manifest_versions(output)
    version = (versions[-1] + 1) if versions else 1
    previous = read_manifest(output, versions[-1]) if versions else None
    prev_shards = {s["name"] for s in previous["shards"]} if previous else set()

    location = state["location"]
    shards, counts = [], Counter()
    for index in state["shards"]:
        superseded = sorted(s["key"] for s in index["samples"] if location.get(s["key"]) != index["shard"])
        live = len(index["samples"]) - len(superseded)
        counts[index["split"]] += live
        shards.append({
            "name": index["shard"],
            "index": index["index"],
            "split": index["split"],
            "count": index["count"],
            "live": live,
            "bytes": index["bytes"],
            "sha256": index["sha256"],
            "samples": [{k: s[k] for k in ("key", "content_hash", "split", "object_id") if k in s}
                        for s in index["samples"]],
            "superseded": superseded,
        })
    if failures is None:
        fsum = {"count": 0, "top_reasons": []}
    elif isinstance(failures, Mapping):
        fsum = dict(failures)
    else:
        fsum = summarize_failures(failures)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": version,
        "previous_version": versions[-1] if versions else None,
        "created": _now(),
        "settings_hash": settings_hash,
        "source_list_hash": source_list_hash,
        "config": dict(config or {}),
        "num_objects": len(state["objects"]),
        "counts": {"train": counts["train"], "val": counts["val"]},
        "num_shards": len(shards),
        "new_shards": [s["name"] for s in shards if s["name"] not in prev_shards],
        "orphans": list(state.get("orphans", [])),
        "shards": shards,
        "failures": fsum,
        **dict(extra or {}),
    }
    uri = manifest_uri(output, version)
    if storage.exists(uri):  # another driver won the race: never overwrite
        raise FileExistsError(f"{uri} already exists; manifest versions are append-only")
    storage.write_text(uri, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return uri


def current_samples(manifest: Mapping[str, Any], split: str | None = None) -> dict[str, set[str]]:
    """``{shard name: {keys}}`` of the current (not superseded) samples, optionally of one split."""
    out: dict[str, set[str]] = {}
    for shard in manifest["shards"]:
        dead = set(shard.get("superseded", ()))
        keys = {s["key"] for s in shard["samples"] if s["key"] not in dead and (split is None or s["split"] == split)}
        if keys:
            out[shard["name"]] = keys
    return out


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------
_FAILURE_FIELDS = ("object_id", "uri", "reason", "log_tail", "seconds", "time")


def failures_uri(output: str, version: int) -> str:
    return storage.join(output, FAILURES_DIR, f"v{version:06d}.jsonl")


def _version_number(version: int | str) -> int:
    if isinstance(version, int):
        return version
    m = _VERSION_RE.fullmatch(storage.basename(str(version)))
    if not m:
        raise ValueError(f"not a version number or manifest URI: {version!r}")
    return int(m.group(1))


def write_failures(output: str, version: int | str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Write one run's failures as JSON lines to ``failures/vNNNNNN.jsonl`` (never overwrites).

    ``version`` is a number or the URI of the manifest version of the same run
    (``.../manifest/v000003.json`` -> ``failures/v000003.jsonl``). Extra row fields are kept.

    Each row needs ``object_id``; ``uri``, ``reason``, ``log_tail``, ``seconds`` default to empty
    values and ``time`` to now. ``key`` (the sanitized id) and ``version`` are added.
    """
    version = _version_number(version)
    uri = failures_uri(output, version)
    if storage.exists(uri):
        raise FileExistsError(f"{uri} already exists; failure tables are append-only")
    lines = []
    for r in rows:
        if "object_id" not in r:
            raise ValueError(f"failure row without object_id: {dict(r)!r}")
        row = {"object_id": str(r["object_id"]), "uri": str(r.get("uri", "")), "reason": str(r.get("reason", "")),
               "log_tail": str(r.get("log_tail", "")), "seconds": float(r.get("seconds") or 0.0),
               "time": str(r.get("time") or _now())}
        row.update({k: v for k, v in r.items() if k not in row})
        row["key"] = sanitize_object_id(row["object_id"])
        row["version"] = version
        lines.append(json.dumps(row, sort_keys=True))
    storage.write_text(uri, "".join(line + "\n" for line in lines))
    return uri


def read_failures(output: str, drop_committed: bool = False) -> list[dict]:
    """Failure rows of all versions, the latest row per object (sorted by object id).

    With ``drop_committed``, objects whose key is committed in some shard now are left out.
    """
    base = storage.join(output, FAILURES_DIR)
    latest: dict[str, dict] = {}
    files = []
    for uri in storage.listdir(base, suffix=".jsonl"):
        m = _VERSION_RE.fullmatch(uri[len(base) + 1:])
        if m:
            files.append((int(m.group(1)), uri))
    for _, uri in sorted(files):
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                row = json.loads(line)
                latest[row["object_id"]] = row
    rows = [latest[k] for k in sorted(latest)]
    if drop_committed:
        done = committed_state(output)["objects"]
        rows = [r for r in rows if r.get("key", sanitize_object_id(r["object_id"])) not in done]
    return rows


# --------------------------------------------------------------------------------------------
# leftovers of killed writers
# --------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer_dead(name: str, mtime: float, max_age_s: float, now: float) -> bool:
    m = _TEMP_RE.fullmatch(name)
    if m is None:
        return False
    if m.group("pid") and m.group("host") == socket.gethostname():
        return not _pid_alive(int(m.group("pid")))
    return now - mtime > max_age_s


def clean_stale_temporaries(output: str, max_age_s: float, now: float | None = None) -> list[str]:
    """Remove the temporaries of dead writers under ``output`` (shards, indexes, manifest and
    failures versions); returns what was removed (see the module docstring for "dead")."""
    now = time.time() if now is None else now
    removed: list[str] = []
    output = str(output).rstrip("/")
    if storage.is_s3(output):
        bucket, key = storage.split_s3(output)
        prefix = key.rstrip("/") + "/" if key else ""
        client = storage.s3_client()
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for up in page.get("Uploads", []):
                if now - up["Initiated"].timestamp() > max_age_s:
                    client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    removed.append(f"s3://{bucket}/{up['Key']} (incomplete upload {up['UploadId']})")
        return removed
    for folder in (output, storage.join(output, MANIFEST_DIR), storage.join(output, FAILURES_DIR)):
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # its writer finished (or another run removed it)
                if entry.is_file(follow_symlinks=False) and \
                        _writer_dead(entry.name, entry.stat(follow_symlinks=False).st_mtime, max_age_s, now):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return sorted(removed)


# --------------------------------------------------------------------------------------------
# one run's writes: what render and pseudo-GT share
# --------------------------------------------------------------------------------------------
def is_retryable(failure: Mapping[str, Any]) -> bool:
    """Whether a recorded failure was the environment's (tried again on the next run). Rows
    written before the flag existed: fetch failures were the environment's."""
    return bool(failure.get("retryable", str(failure.get("reason", "")).startswith("fetch failed:")))


def plan(ids: Iterable[str], hashes: Mapping[str, str], done: Mapping[str, str], prev_failures: Mapping[str, Mapping],
         *, hash_field: str, force: bool = False, retry_failed: bool = False) -> tuple[list[str], int, int]:
    """``(todo ids, skipped, previously_failed)``: an id is skipped when committed with the same
    hash (``done``: id -> committed hash), and skipped as failed before when its last failure
    row has the same hash in ``hash_field`` and was not :func:`is_retryable`."""
    todo, skipped, previously_failed = [], 0, 0
    for oid in ids:
        h = hashes[oid]
        prev = prev_failures.get(oid)
        if not force and done.get(oid) == h:
            skipped += 1
        elif not force and not retry_failed and prev and prev.get(hash_field) == h and not is_retryable(prev):
            previously_failed += 1
        else:
            todo.append(oid)
    return todo, skipped, previously_failed


class DatasetRun:
    """One run's writes to a shard dataset at ``output`` (module docstring, "One run's writes").

    ::

        run = DatasetRun(out, samples_per_shard, val_fraction, stale_max_age_s)
        todo, skipped, failed_before = plan(ids, hashes, run.done, run.prev_failures, hash_field="...")
        if not todo and not run.changed(settings_hash, list_hash): ...   # nothing to do
        run.add(sample, content_hash, object_id) / run.fail({...})
        run.commit(settings_hash=..., source_list_hash=..., config=...)  # manifest + failures, if changed

    An exception between construction and :meth:`commit`: call :meth:`abort` (discards the open
    shards; committed ones stay and the next run resumes from them).
    """

    def __init__(self, output: str, samples_per_shard: int, val_fraction: float, stale_max_age_s: float):
        self.output = str(output).rstrip("/")
        self.val_fraction = val_fraction
        self.stale_removed = clean_stale_temporaries(self.output, stale_max_age_s)
        self.state = committed_state(self.output)
        self.done: dict[str, str] = self.state["objects"]  # key -> content hash of its committed sample
        self.prev_failures = {r["object_id"]: r for r in read_failures(self.output)}
        self.failures: list[dict] = []  # this run's new failure rows
        self.writer = ShardWriter(self.output, samples_per_shard, start_index=self.state["next_index"])
        self.manifest_uri: str | None = None
        self.failures_uri: str | None = None

    def add(self, sample: Mapping[str, Any], content_hash: str, object_id: str) -> None:
        """Add a checked sample; its split is :func:`split_for` of ``object_id``."""
        self.writer.add(sample, content_hash, split_for(object_id, self.val_fraction))

    def fail(self, row: Mapping[str, Any]) -> None:
        """Record a failure row (``object_id``, ``reason``, ... see :func:`write_failures`)."""
        self.failures.append(dict(row))

    def changed(self, settings_hash: str, source_list_hash: str) -> bool:
        """Whether a manifest version is due: new shards or failures in this run, no manifest yet,
        or the latest one records another settings or source list hash."""
        if self.writer.committed or self.failures:
            return True
        latest = read_latest_manifest(self.output)
        return latest is None or latest.get("source_list_hash") != source_list_hash \
            or latest.get("settings_hash") != settings_hash

    @property
    def new_shards(self) -> list[str]:
        return [storage.join(self.output, c["shard"]) for c in self.writer.committed]

    def commit(self, *, settings_hash: str, source_list_hash: str, config: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> tuple[str | None, str | None]:
        """Commit the open shards, then a new manifest version and this run's failures version
        when :meth:`changed`; returns ``(manifest_uri, failures_uri)`` (None: not written)."""
        self.writer.close()
        if self.changed(settings_hash, source_list_hash):
            self.manifest_uri = write_manifest_version(self.output, settings_hash=settings_hash,
                                                       source_list_hash=source_list_hash, config=config,
                                                       failures=self.failures, extra=extra)
        if self.failures:
            self.failures_uri = write_failures(self.output, self.manifest_uri, self.failures)
        return self.manifest_uri, self.failures_uri

    def abort(self, exc: BaseException | None = None) -> None:
        self.writer.abort(exc)
