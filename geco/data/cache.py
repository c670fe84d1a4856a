"""A per-node cache of raw objects, so a renderer always loads from a local path.

``ObjectCache(dir, max_gb).fetch(ref) -> Path`` of the main file, with its sidecars laid out
beside it as their relative paths expect (``.mtl`` next to the ``.obj``, textures where the
``.mtl`` says):

the ref's source kind decides (:class:`geco.sources.Source`): ``local_path(ref)`` is a file usable
in place (local ``dir``/``gso`` files, the ``objaverse`` package's own cache), otherwise
``build(ref, folder)`` fills a new entry (``s3://`` downloads, GSO's texture aliases, generated
``procedural://`` objects). This module knows no kind by name. An entry whose files would land
outside its folder is refused (:class:`geco.sources.UnsafePath`), whatever the kind.

Layout under ``dir`` (default: ``<system temp>/geco-object-cache-<uid>``, shared by the processes
of one user on a node)::

    entries/<object_id>-<hash16>/   one object version, with .geco-entry.json (main file, size)
    locks/<object_id>-<hash16>.lock one flock file per entry
    locks/.evict.lock               one evictor at a time
    tmp/                            entries being built

Safety between processes of a node: an entry is built under an exclusive ``flock`` in ``tmp/``
with a unique name and appears by one atomic ``rename``, so a reader sees a whole entry or none,
and two processes never download the same object twice. Size cap: after each new entry, entries
are evicted least recently used first (access time = the marker's mtime, set on every fetch,
since file-system atimes are unreliable) until the total is under ``max_gb``. An entry that a
process holds through :meth:`ObjectCache.pinned` (a shared ``flock``) is never evicted; a plain
:meth:`fetch` result is only protected by being the most recently used. The newest entry is
kept even when it alone exceeds the cap.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISDIR
from typing import IO

from geco.sources import UnsafePath, kind_of

MARKER = ".geco-entry.json"


def entry_key(ref) -> str:
    return f"{ref.object_id}-{ref.content_hash[:16] or 'nohash'}"


class ObjectCache:
    def __init__(self, dir: str | Path = "", max_gb: float = 20.0):
        self.root = Path(dir) if str(dir) else Path(tempfile.gettempdir()) / f"geco-object-cache-{os.getuid()}"
        self.max_bytes = int(max_gb * (1 << 30))
        self._created_root = not self.root.exists()
        for sub in ("entries", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._created: set[str] = set()

    @classmethod
    def from_config(cls, cfg) -> ObjectCache:
        """From a :class:`geco.config.CacheConfig`."""
        return cls(cfg.dir, cfg.max_gb)

    # -- public --------------------------------------------------------------------------------
    def fetch(self, ref) -> Path:
        """A local path of ``ref``'s main file (see the module docstring for each kind)."""
        in_place = kind_of(ref).local_path(ref)
        if in_place is not None:
            return in_place
        key = entry_key(ref)
        with self._entry_lock(key, fcntl.LOCK_SH):  # shared: fine while this process pins it
            path = self._lookup(key)
        if path is None:
            with self._entry_lock(key, fcntl.LOCK_EX):  # one builder; others wait, then find it
                path = self._get_or_build(ref)
            self.evict(keep=key)
        return path

    @contextlib.contextmanager
    def pinned(self, ref) -> Iterator[Path]:
        """``with cache.pinned(ref) as path:`` — the entry cannot be evicted inside the block."""
        in_place = kind_of(ref).local_path(ref)
        if in_place is not None:
            yield in_place
            return
        key = entry_key(ref)
        for _ in range(5):
            with self._entry_lock(key, fcntl.LOCK_SH):
                main = self._lookup(key)
                if main is not None:
                    yield main
                    return
            self.fetch(ref)  # build it, then pin it on the next pass
        raise RuntimeError(f"{ref.object_id}: cache entry kept disappearing (cache cap too small?)")

    def total_bytes(self) -> int:
        return sum(m["size"] for _, m in self._entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Evict least recently used entries until the cache is under its cap; returns their keys."""
        evicted: list[str] = []
        with self._lock_file(self.root / "locks" / ".evict.lock", fcntl.LOCK_EX):
            entries = self._entries()
            total = sum(m["size"] for _, m in entries)
            for key, meta in sorted(entries, key=lambda e: e[1]["atime_ns"]):
                if total <= self.max_bytes:
                    break
                if key == keep:
                    continue
                try:
                    with self._entry_lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        self._remove_entry(key)
                except BlockingIOError:
                    continue  # pinned or being built by someone: skip it
                total -= meta["size"]
                evicted.append(key)
            self._sweep_tmp()
        return evicted

    def cleanup(self) -> None:
        """Remove every entry this instance created (and the cache folder if it created it and
        nothing else is left)."""
        for key in sorted(self._created):
            try:
                with self._entry_lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    self._remove_entry(key)
                (self.root / "locks" / f"{key}.lock").unlink(missing_ok=True)
            except BlockingIOError:
                pass  # another process is using it right now
        self._created.clear()
        if self._created_root and not any((self.root / "entries").iterdir()):
            shutil.rmtree(self.root, ignore_errors=True)

    # -- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock_file(self, path: Path, mode: int) -> Iterator[IO]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, mode)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _entry_lock(self, key: str, mode: int):
        return self._lock_file(self.root / "locks" / f"{key}.lock", mode)

    def _lookup(self, key: str) -> Path | None:
        """The main file of a complete entry (and mark it used now), or None."""
        marker = self.root / "entries" / key / MARKER
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        now = time.time_ns()
        os.utime(marker, ns=(now, now))
        return self.root / "entries" / key / meta["main"]

    def _entries(self) -> list[tuple[str, dict]]:
        out = []
        for d in (self.root / "entries").iterdir():
            marker = d / MARKER
            try:
                meta = json.loads(marker.read_text())
                meta["atime_ns"] = marker.stat().st_mtime_ns
            except (OSError, ValueError):
                continue
            out.append((d.name, meta))
        return out

    def _remove_entry(self, key: str) -> None:
        src = self.root / "entries" / key
        if not src.exists():
            return
        trash = self.root / "tmp" / f"trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(src, trash)  # readers see the entry or nothing, never half of it
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_tmp(self, older_than_s: float = 3600.0) -> None:
        """Remove builds left behind by crashed processes."""
        cutoff = time.time() - older_than_s
        for d in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if d.lstat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()

    def _get_or_build(self, ref) -> Path:
        key = entry_key(ref)
        found = self._lookup(key)
        if found is not None:
            return found
        final = self.root / "entries" / key
        if final.exists():  # a leftover without a marker: not a complete entry
            self._remove_entry(key)
        tmp = self.root / "tmp" / f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            main = self._build(ref, tmp)
            size = sum(st.st_size for st in (p.lstat() for p in tmp.rglob("*")) if not S_ISDIR(st.st_mode))
            meta = {"object_id": ref.object_id, "content_hash": ref.content_hash, "uri": ref.uri,
                    "main": main, "size": size, "created": time.time()}
            (tmp / MARKER).write_text(json.dumps(meta))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._created.add(key)
        return final / main

    def _build(self, ref, out: Path) -> str:
        """Fill ``out`` with the object's files (its kind's ``build``, which refuses sidecar
        paths that leave ``out``); the main file's path relative to ``out``, checked too."""
        main = kind_of(ref).build(ref, out)
        norm = posixpath.normpath(main)
        if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
            raise UnsafePath(f"{ref.object_id}: main file {main!r} lies outside its cache entry; refusing it")
        return main
