"""``objaverse``: a local or ``s3://`` text file, one Objaverse 1.0 UID per line.

``#`` comments and blank lines are ignored, a trailing ``.glb`` stripped, duplicates dropped.
Resolved through the ``objaverse`` package (0.1.7) and its on-disk cache
``<base>/hf-objaverse-v1/``: ``object-paths.json.gz`` (uid -> ``glbs/<group>/<uid>.glb``) and
``metadata/<group>.json.gz`` (annotations; ``license`` such as ``by``, ``by-nc``, ``cc0``).
``<base>`` is ``SourceConfig.objaverse_cache`` or the package default ``~/.objaverse``. The
package downloads those index files from Hugging Face when they are missing. The content hash is
derived from the object path (Objaverse 1.0 files never change under a UID). Rendering nodes
download the ``.glb`` through the package (:func:`fetch_objaverse`) unless cached; those files
are the package's, outside the object cache's cap. Detected (``source.kind: auto``) for a
``.txt``/``.csv`` file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geco import storage
from geco.sources.base import ObjectRef, Source, SourceError, has_scheme, register, rejected, sanitize, sha

OBJAVERSE_HF_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
UID_LIST_SUFFIXES = (".txt", ".csv")


def read_uid_list(uri: str) -> list[str]:
    """UIDs from a text file: one per line, ``#`` comments, blank lines, ``.glb`` suffixes and
    duplicates dropped, order kept."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise SourceError(f"{uri}: UID list not found (source.uri for kind=objaverse)") from None
    except IsADirectoryError:
        raise SourceError(f"{uri} is a folder, not a UID list (source.kind=objaverse wants a .txt file of "
                          "Objaverse UIDs; for a folder of objects set source.kind=auto or dir)") from None
    except UnicodeDecodeError:
        raise SourceError(f"{uri}: UID list is not UTF-8 text") from None
    out: dict[str, None] = {}
    for line in text.splitlines():
        uid = line.split("#", 1)[0].strip()
        uid = uid.removesuffix(".glb")
        if uid:
            out.setdefault(uid, None)
    return list(out)


_OBJAVERSE_LOCK = threading.Lock()


@contextlib.contextmanager
def objaverse_base(base: str = "") -> Iterator[Any]:
    """The ``objaverse`` module with its cache at ``base`` (empty = its default ``~/.objaverse``).

    objaverse 0.1.7 reads the module-level ``_VERSIONED_PATH`` (``BASE_PATH/hf-objaverse-v1``)
    at call time and has no parameter for it; this is the one place that sets it, for the
    duration of the block and under a lock (threads in one process), then restores it.
    """
    import objaverse

    with _OBJAVERSE_LOCK:
        saved = objaverse.BASE_PATH, objaverse._VERSIONED_PATH
        if base:
            root = os.path.abspath(os.path.expanduser(base))
            objaverse.BASE_PATH = root
            objaverse._VERSIONED_PATH = os.path.join(root, "hf-objaverse-v1")
        try:
            yield objaverse
        finally:
            objaverse.BASE_PATH, objaverse._VERSIONED_PATH = saved


def _network_error(what: str, base: str, e: Exception) -> SourceError:
    where = base or "~/.objaverse"
    return SourceError(f"objaverse: could not {what} ({type(e).__name__}: {e}); this needs access to "
                       f"huggingface.co or a pre-filled cache under {where}/hf-objaverse-v1")


def fetch_objaverse(ref: ObjectRef) -> Path:
    """The local ``.glb`` of an Objaverse ref, downloaded through the package when not cached.

    A lock file per UID keeps two processes on a node from downloading the same object into the
    package's single ``<uid>.glb.tmp`` name at once.
    """
    uid, base = ref.extra["uid"], ref.extra.get("objaverse_cache", "")
    with objaverse_base(base) as ov:
        versioned = ov._VERSIONED_PATH
    target = Path(versioned) / ref.extra["object_path"]
    if target.is_file():
        return target
    locks = Path(versioned) / ".geco-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{sanitize(uid)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        with objaverse_base(base) as ov:
            try:
                got = ov.load_objects([uid], download_processes=1)
            except (OSError, ValueError) as e:
                raise _network_error(f"download {uid}", base, e) from None
        if uid not in got or not Path(got[uid]).is_file():
            raise SourceError(f"objaverse: {uid} could not be downloaded into {versioned}")
        return Path(got[uid])


class ObjaverseSource(Source):
    kind = "objaverse"
    detect_order = 20

    def detect(self, uri: str) -> bool:
        if not uri.lower().endswith(UID_LIST_SUFFIXES):
            return False
        return storage.is_s3(uri) or (not has_scheme(uri) and Path(uri).is_file())

    def list(self, cfg) -> tuple[list[ObjectRef], list[ObjectRef]]:
        uids = read_uid_list(cfg.uri)
        base = cfg.objaverse_cache
        with objaverse_base(base) as ov:
            try:
                paths = ov._load_object_paths()
            except (OSError, ValueError) as e:  # urllib errors are OSErrors; bad gzip/json ValueErrors
                raise _network_error("load object-paths.json.gz", base, e) from None
            known = [u for u in uids if u in paths]
            try:
                annotations = ov.load_annotations(known) if known else {}
            except (OSError, ValueError) as e:
                raise _network_error("load the annotations (metadata/*.json.gz)", base, e) from None
        refs, rejects = [], []
        for uid in uids:
            if uid not in paths:
                rejects.append(rejected(sanitize(uid), f"objaverse:{uid}", "objaverse",
                                        "not an Objaverse 1.0 UID (not in object-paths.json.gz)", uid=uid))
                continue
            object_path = paths[uid]
            meta = annotations.get(uid, {})
            license = meta.get("license") or None
            extra = {"uid": uid, "object_path": object_path, "objaverse_cache": base}
            if meta.get("name"):
                extra["name"] = meta["name"]
            refs.append(ObjectRef(sanitize(uid), f"{OBJAVERSE_HF_URL}/{object_path}", (),
                                  sha("objaverse-1.0", object_path), license, "objaverse", extra))
        return refs, rejects

    def local_path(self, ref: ObjectRef) -> Path | None:
        return fetch_objaverse(ref)


register(ObjaverseSource())
