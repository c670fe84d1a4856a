"""Sources made of files (``dir`` and ``gso``): a file tree listed once, sidecar discovery, the
content hash, and how the object cache lays the files out.

A tree is a local folder or an ``s3://`` prefix, keyed by POSIX paths relative to its root;
hidden files are skipped. Sidecars: for ``.obj`` its ``mtllib`` files and every texture they
reference (``map_Kd`` & co., options skipped, ``\\`` accepted, relative to the ``.mtl``; like
Blender, a reference that does not resolve is also looked up by file name beside the ``.mtl``);
for ``.gltf`` its external ``buffers`` and ``images``. Missing ones are listed in
``extra["missing_materials"]`` / ``extra["missing_textures"]`` / ``extra["missing_buffers"]``
(``ref.warnings()``), never fatal.

Confinement: every path an object names (``mtllib``, a texture, a glTF ``uri``) is resolved and
must stay inside the object's *folder* (the source root for ``dir``, ``<name>/`` for ``gso``);
one that leaves it (``../../x``, ``/etc/x``) makes the object *rejected* with that reason, since
a renderer would otherwise read — and the cache write — outside it. S3 keys with ``.``/``..``
segments are refused the same way, and :meth:`FileSource.build` checks again before it writes.

Content hash: sha256 over (relative path, file digest) of the main file and its sidecars; the
file digest is the sha256 of the bytes for a local file, and ``ETag`` + size for S3 (from the
listing itself: no download and no per-file request is needed to decide what changed).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geco import storage
from geco.sources.base import ObjectRef, Source, SourceError, UnsafePath, sha

SUPPORTED_EXTENSIONS = (".glb", ".gltf", ".obj")
TEXTURE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff", ".exr", ".hdr",
                                ".webp", ".gif", ".dds", ".ktx2"})
#: Files in a ``dir`` source that are not objects and not worth a failure record.
IGNORED_EXTENSIONS = TEXTURE_EXTENSIONS | frozenset({
    ".mtl", ".bin", ".txt", ".md", ".rst", ".json", ".csv", ".tsv", ".yaml", ".yml", ".xml", ".html",
    ".pdf", ".license", ".sdf", ".config", ".log"})
# Bytes of an .obj searched for its `mtllib` lines (exporters write them in the header).
OBJ_HEADER_BYTES = 1 << 20


@dataclass
class _File:
    uri: str
    size: int
    etag: str = ""  # S3 only


class FileTree:
    """All files under a root, keyed by POSIX path relative to it; hidden files skipped.
    ``unsafe`` holds S3 keys whose relative path has ``.``/``..``/empty segments."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if storage.is_s3(root) else str(Path(root))
        self.s3 = storage.is_s3(root)
        self.files: dict[str, _File] = {}
        self.unsafe: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        if self.s3:
            storage.check_readable(root)
            bucket, key = storage.split_s3(self.root)
            prefix = key.rstrip("/") + "/" if key else ""
            with storage.s3_errors(root, missing="bucket"):
                pages = list(storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if not rel or rel.endswith("/") or hidden(rel):
                        continue
                    uri = f"s3://{bucket}/{obj['Key']}"
                    if any(part in ("", ".", "..") for part in rel.split("/")):
                        self.unsafe[rel] = uri
                    else:
                        self.files[rel] = _File(uri, obj["Size"], obj.get("ETag", "").strip('"'))
        else:
            base = Path(self.root)
            if not base.is_dir():
                raise SourceError(f"{root}: not a directory (source.uri must name a folder of objects)")
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    p = Path(dirpath) / name
                    rel = p.relative_to(base).as_posix()
                    if not hidden(rel) and p.is_file():
                        self.files[rel] = _File(str(p), p.stat().st_size)

    def uri(self, rel: str) -> str:
        return self.files[rel].uri

    def read(self, rel: str, limit: int | None = None) -> bytes:
        f = self.files[rel]
        if self.s3:
            bucket, key = storage.split_s3(f.uri)
            kw = {"Range": f"bytes=0-{limit - 1}"} if limit and f.size > limit else {}
            with storage.s3_errors(f.uri):
                return storage.s3_client().get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
        with open(f.uri, "rb") as fh:
            return fh.read(limit if limit else -1)

    def digest(self, rel: str) -> str:
        """sha256 of the bytes (local) or ETag + size (S3), memoised per listing."""
        if rel not in self._digests:
            f = self.files[rel]
            if self.s3:
                self._digests[rel] = f"s3-etag:{f.etag}:{f.size}"
            else:
                h = hashlib.sha256()
                with open(f.uri, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                self._digests[rel] = "sha256:" + h.hexdigest()
        return self._digests[rel]

    def content_hash(self, main: str, sidecars: list[str], aliases: dict[str, str] | None = None) -> str:
        return sha([[rel, self.digest(rel)] for rel in [main, *sorted(sidecars)]], sorted((aliases or {}).items()))


def hidden(rel: str) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in rel.split("/"))


def ext(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return ("." + name.rsplit(".", 1)[1].lower()) if "." in name.lstrip(".") else ""


def resolve(base_dir: str, ref: str) -> str:
    """A path written in a file (``..\\tex\\a.png``, percent-free) relative to ``base_dir``."""
    ref = ref.strip().strip('"').replace("\\", "/")
    return posixpath.normpath(posixpath.join(base_dir, ref)) if not posixpath.isabs(ref) else ref


def escapes(path: str, folder: str = "") -> bool:
    """Whether a normalised relative ``path`` lies outside ``folder`` (``""`` = the root)."""
    if posixpath.isabs(path) or path == ".." or path.startswith("../"):
        return True
    return bool(folder) and not path.startswith(folder.rstrip("/") + "/")


def _check(path: str, written: str, folder: str) -> None:
    if escapes(path, folder):
        where = f"the object's folder {folder.rstrip('/')}/" if folder else "the source folder"
        raise UnsafePath(f"unsafe path {written!r}: it leaves {where}; refusing the object")


# ---------------------------------------------------------------------------------------------
# OBJ / MTL / glTF sidecars
# ---------------------------------------------------------------------------------------------
# MTL statements that name a texture file, and their options with how many arguments they take
# (Wavefront MTL spec; -o/-s/-t take 1-3 numbers).
_MTL_MAPS = {"map_ka", "map_kd", "map_ks", "map_ns", "map_d", "map_bump", "bump", "disp", "decal", "refl",
             "map_pr", "map_pm", "map_ps", "map_ke", "norm", "map_tr", "map_refl"}
_MTL_OPTIONS = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                "-texres": 1, "-type": 1, "-mm": 2, "-o": 3, "-s": 3, "-t": 3}


def _number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def parse_mtl_textures(text: str) -> list[str]:
    """The texture file names an ``.mtl`` references, as written (options removed), in order."""
    out: list[str] = []
    for line in text.splitlines():
        tokens = line.strip().split()
        if not tokens or tokens[0].lower() not in _MTL_MAPS:
            continue
        i = 1
        while i < len(tokens) and tokens[i].lower() in _MTL_OPTIONS:
            nargs = _MTL_OPTIONS[tokens[i].lower()]
            i += 1
            taken = 0
            while taken < nargs and i < len(tokens) - 1 and (taken == 0 or _number(tokens[i])):
                i, taken = i + 1, taken + 1
        name = " ".join(tokens[i:])
        if name and name not in out:
            out.append(name)
    return out


def parse_obj_mtllibs(head: bytes) -> list[str]:
    """The ``mtllib`` names in an ``.obj`` header (a name may contain spaces)."""
    out = []
    for line in head.decode("utf-8", "replace").splitlines():
        if line.startswith("mtllib"):
            rest = line[6:].strip()
            if rest and rest not in out:
                out.append(rest)
    return out


def _obj_sidecars(tree: FileTree, rel: str, folder: str, fallback: Callable[[str], str | None] | None = None
                  ) -> tuple[list[str], dict[str, Any]]:
    """Sidecar paths (relative to the tree) of ``rel`` and the ``extra`` notes about them.

    ``fallback(expected_rel)`` may name another file for a texture that is not where the ``.mtl``
    says; it is then recorded in ``extra["aliases"]`` (relative to the ``.obj``'s folder).
    """
    sidecars: list[str] = []
    extra: dict[str, Any] = {}
    obj_dir = posixpath.dirname(rel)
    try:
        head = tree.read(rel, OBJ_HEADER_BYTES)
    except OSError:
        return sidecars, extra
    for lib in parse_obj_mtllibs(head):
        # Blender reads the whole rest of the line as one name; fall back to space-separated names
        candidates = [lib] if resolve(obj_dir, lib) in tree.files else lib.split()
        for name in candidates:
            mtl = resolve(obj_dir, name)
            _check(mtl, name, folder)
            if mtl not in tree.files:
                extra.setdefault("missing_materials", []).append(name)
                continue
            if mtl not in sidecars:
                sidecars.append(mtl)
            mtl_dir = posixpath.dirname(mtl)
            for tex in parse_mtl_textures(tree.read(mtl).decode("utf-8", "replace")):
                path = resolve(mtl_dir, tex)
                _check(path, tex, folder)
                beside = posixpath.join(mtl_dir, posixpath.basename(tex.replace("\\", "/")))
                if path in tree.files:
                    found = path
                elif beside in tree.files:  # Blender also looks for the file name beside the .mtl
                    found = beside
                elif fallback and (alt := fallback(path)):
                    found = alt
                    extra.setdefault("aliases", {})[posixpath.relpath(path, obj_dir or ".")] = tree.uri(alt)
                else:
                    extra.setdefault("missing_textures", []).append(tex)
                    continue
                if found not in sidecars:
                    sidecars.append(found)
    return sidecars, extra


def _gltf_sidecars(tree: FileTree, rel: str, folder: str) -> tuple[list[str], dict[str, Any]]:
    sidecars: list[str] = []
    extra: dict[str, Any] = {}
    try:
        doc = json.loads(tree.read(rel))
        entries = [("missing_buffers", b.get("uri")) for b in doc.get("buffers", [])]
        entries += [("missing_textures", im.get("uri")) for im in doc.get("images", [])]
    except (ValueError, AttributeError, OSError) as e:
        extra["unreadable"] = f"glTF JSON could not be read: {type(e).__name__}: {e}"[:300]
        return sidecars, extra
    base = posixpath.dirname(rel)
    for key, uri in entries:
        if not isinstance(uri, str) or uri.startswith("data:"):
            continue
        path = resolve(base, urllib.parse.unquote(uri))
        _check(path, uri, folder)
        if path in tree.files:
            if path not in sidecars:
                sidecars.append(path)
        else:
            extra.setdefault(key, []).append(uri)
    return sidecars, extra


def object_ref(tree: FileTree, rel: str, object_id: str, kind: str, license: str | None = None,
               fallback: Callable[[str], str | None] | None = None, folder: str = "", **extra) -> ObjectRef:
    """The ref of the file ``rel`` with its sidecars; raises :class:`UnsafePath` when one of its
    references leaves ``folder`` (relative to the tree root; ``""`` = the root)."""
    suffix = ext(rel)
    if suffix == ".obj":
        sidecars, notes = _obj_sidecars(tree, rel, folder, fallback)
    elif suffix == ".gltf":
        sidecars, notes = _gltf_sidecars(tree, rel, folder)
    else:
        sidecars, notes = [], {}
    content = tree.content_hash(rel, sidecars, notes.get("aliases"))
    return ObjectRef(object_id, tree.uri(rel), tuple(tree.uri(s) for s in sidecars), content, license, kind,
                     {**extra, **notes})


# ---------------------------------------------------------------------------------------------
# Fetching: in place, or laid out in a cache entry
# ---------------------------------------------------------------------------------------------
class FileSource(Source):
    """Fetching for file-based kinds: a local file without aliases is used in place; S3 objects
    (and local ones with ``extra["aliases"]``) are laid out in a cache entry."""

    def local_path(self, ref: ObjectRef) -> Path | None:
        if storage.is_s3(ref.uri) or ref.extra.get("aliases"):
            return None
        path = Path(ref.uri)
        if not path.is_file():
            raise FileNotFoundError(f"{ref.uri}: object file not found")
        return path

    def build(self, ref: ObjectRef, out: Path) -> str:
        """S3 objects are downloaded with their sidecars, keeping their layout relative to the
        deepest folder that holds them all; local ones become a folder of links to the originals.
        GSO's aliases become links to the real texture. Any path that would leave ``out`` raises
        :class:`UnsafePath` before anything is written."""
        uris = [ref.uri, *ref.sidecars]
        if storage.is_s3(ref.uri):
            keys = [storage.split_s3(u)[1] for u in uris]
            for u, k in zip(uris, keys):
                if any(part in ("", ".", "..") for part in k.split("/")):
                    raise UnsafePath(f"unsafe S3 key {u!r}: '.'/'..' segments; refusing the object")
            common = posixpath.commonpath([posixpath.dirname(k) for k in keys]) if len(keys) > 1 else \
                posixpath.dirname(keys[0])
            rels = {u: posixpath.relpath(k, common or ".") for u, k in zip(uris, keys)}
        else:
            paths = [os.path.abspath(u) for u in uris]
            common = os.path.commonpath([os.path.dirname(p) for p in paths])
            rels = {u: Path(os.path.relpath(p, common)).as_posix() for u, p in zip(uris, paths)}
        main = rels[ref.uri]
        main_dir = posixpath.dirname(main)
        links = {}
        for u, rel in rels.items():
            _check(posixpath.normpath(rel), u, "")
        for alias, target_uri in ref.extra.get("aliases", {}).items():
            link = posixpath.normpath(posixpath.join(main_dir, alias))
            _check(link, alias, "")
            if link in rels.values() or target_uri not in rels:
                continue  # a real file already, or not one of its files
            links[link] = rels[target_uri]
        for u, rel in rels.items():
            if storage.is_s3(u):
                storage.download(u, out / rel)
            else:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(u), out / rel)
        for link, target in links.items():
            (out / link).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(posixpath.relpath(target, posixpath.dirname(link) or "."), out / link)
        return main
