"""Object sources: what there is to render, as a sorted list of :class:`ObjectRef`.

``list_objects(cfg)`` returns a :class:`SourceListing` with three sorted lists:

* ``objects`` — what to render (licence filter and ``limit`` applied);
* ``rejected`` — things the source offers that can never render, each with
  ``ref.reason``: files with an unsupported extension (``"unsupported extension .fbx: supported
  are .glb .gltf .obj"``), Objaverse UIDs that do not exist, GSO folders without
  ``meshes/model.obj``, two files that map to the same object id. The render stage writes them
  to its failures table as they are, without sending them to a renderer. They are never cut by
  ``limit`` (a cheap record, and the user should see them).
* ``excluded`` — objects dropped on purpose because their licence is in ``exclude_licenses``
  (``ref.reason`` says which); counted and logged, not failures.

Kinds (``SourceConfig.kind``):

``dir``
    A local folder or ``s3://`` prefix of ``.glb`` / ``.gltf`` / ``.obj`` files, searched
    recursively. The id is the path relative to the root, without the extension, ``/`` -> ``-``,
    then :func:`geco.data.schema.sanitize_object_id` (``chairs/red.glb`` -> ``chairs-red``).
    Sidecars: for ``.obj`` its ``mtllib`` files and every texture they reference (``map_Kd`` &
    co., options skipped, ``\\`` accepted, relative to the ``.mtl``; like Blender, a reference
    that does not resolve is also looked up by file name beside the ``.mtl``); for ``.gltf`` its
    external ``buffers`` and ``images``. Missing ones are listed in ``extra["missing_materials"]``
    / ``extra["missing_textures"]`` / ``extra["missing_buffers"]`` (``ref.warnings()`` words them
    for ``meta.json``), never fatal. Zero-byte or broken files are still listed: the renderer
    records the reason. Images, ``.mtl``, ``.bin``, hidden files and metadata/doc files
    (:data:`IGNORED_EXTENSIONS`) are not objects and are ignored; any other file is ``rejected``.
    Content hash: sha256 over (relative path, file digest) of the main file and its sidecars;
    the file digest is the sha256 of the bytes for a local file, and ``ETag`` + size for S3 (from
    the listing itself: no download and no per-file request is needed to decide what changed).
``objaverse``
    A local or ``s3://`` text file, one Objaverse 1.0 UID per line (``#`` comments and blank
    lines ignored, a trailing ``.glb`` stripped, duplicates dropped). Resolved through the
    ``objaverse`` package (0.1.7) and its on-disk cache ``<base>/hf-objaverse-v1/``:
    ``object-paths.json.gz`` (uid -> ``glbs/<group>/<uid>.glb``) and
    ``metadata/<group>.json.gz`` (annotations; ``license`` such as ``by``, ``by-nc``, ``cc0``).
    ``<base>`` is ``SourceConfig.objaverse_cache`` or the package default ``~/.objaverse``. The
    package downloads those index files from Hugging Face when they are missing. The content hash
    is derived from the object path (Objaverse 1.0 files never change under a UID). Rendering
    nodes download the ``.glb`` through the package (:func:`fetch_objaverse`) unless cached.
``gso``
    A Google Scanned Objects folder (local or ``s3://``): ``<name>/meshes/model.obj`` +
    ``model.mtl`` + ``<name>/materials/textures/texture.png``; id ``gso-<name>``; licence
    ``CC-BY-4.0``. GSO's ``model.mtl`` says ``map_Kd texture.png`` (beside the mesh) while the
    file lies in ``materials/textures/``: ``extra["aliases"]`` maps the path the ``.mtl`` expects
    (relative to the mesh's folder) to the real file, and the object cache lays it out so Blender
    finds the texture. Unextracted ``<name>.zip`` archives are ``rejected``.
``procedural``
    ``num_procedural`` objects made by :mod:`geco.data.procedural`, ids ``procedural-0000``...,
    uri ``procedural://<index>?seed=<seed>[&format=obj]``: generated on the node that renders
    them, so no shared filesystem is needed. ``SourceConfig.uri`` may be empty or
    ``procedural://?seed=7&format=obj`` to pick the seed (default 0) and format (default glb).
    Content hash from the generator version and the parameters.

Licence filter: ``exclude_licenses`` entries are compared to ``ref.license`` case-insensitively
and exactly (``by-nc`` does not exclude ``by-nc-sa``; list both). Objects without a licence are
never excluded. ``limit`` then keeps the first ``limit`` objects in id order.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import posixpath
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geco import storage
from geco.config import SourceConfig

SUPPORTED_EXTENSIONS = (".glb", ".gltf", ".obj")
TEXTURE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff", ".exr", ".hdr",
                                ".webp", ".gif", ".dds", ".ktx2"})
#: Files in a ``dir`` source that are not objects and not worth a failure record.
IGNORED_EXTENSIONS = TEXTURE_EXTENSIONS | frozenset({
    ".mtl", ".bin", ".txt", ".md", ".rst", ".json", ".csv", ".tsv", ".yaml", ".yml", ".xml", ".html",
    ".pdf", ".license", ".sdf", ".config", ".log"})
GSO_LICENSE = "CC-BY-4.0"
OBJAVERSE_HF_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
# Bytes of an .obj searched for its `mtllib` lines (exporters write them in the header).
OBJ_HEADER_BYTES = 1 << 20


class SourceError(RuntimeError):
    """A source that cannot be listed at all (missing folder, unreadable UID list, no network)."""


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectRef:
    """One object of a source. ``uri`` is the main file; ``sidecars`` the other files it needs.

    ``extra`` keys used by the project: ``reason`` (rejected/excluded refs), ``missing_materials``,
    ``missing_textures``, ``missing_buffers``, ``aliases`` ({path relative to the main file's
    folder: source URI}), ``uid``/``object_path``/``objaverse_cache`` (objaverse),
    ``index``/``seed``/``format``/``shape`` (procedural), ``name`` (gso).
    """

    object_id: str
    uri: str
    sidecars: tuple[str, ...] = ()
    content_hash: str = ""
    license: str | None = None
    source_kind: str = "dir"
    extra: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def reason(self) -> str | None:
        """Why a ``rejected``/``excluded`` ref is not rendered (None for renderable objects)."""
        return self.extra.get("reason")

    def warnings(self) -> list[str]:
        """Human-readable, non-fatal problems for ``meta.json`` (e.g. missing textures)."""
        out = []
        for key, what in (("missing_materials", "material library"), ("missing_textures", "texture"),
                          ("missing_buffers", "glTF buffer")):
            for item in self.extra.get(key, []):
                out.append(f"missing {what} {item!r}")
        if "unreadable" in self.extra:
            out.append(self.extra["unreadable"])
        return out

    def to_dict(self) -> dict:
        return {"object_id": self.object_id, "uri": self.uri, "sidecars": list(self.sidecars),
                "content_hash": self.content_hash, "license": self.license,
                "source_kind": self.source_kind, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> ObjectRef:
        return cls(d["object_id"], d["uri"], tuple(d.get("sidecars", ())), d.get("content_hash", ""),
                   d.get("license"), d.get("source_kind", "dir"), dict(d.get("extra", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ObjectRef:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class SourceListing:
    """The result of :func:`list_objects`; every list is sorted by ``object_id``."""

    objects: list[ObjectRef]
    rejected: list[ObjectRef] = field(default_factory=list)
    excluded: list[ObjectRef] = field(default_factory=list)

    def __iter__(self):
        """``objects, rejected, excluded = list_objects(cfg)`` (all three are lists of ObjectRef)."""
        return iter((self.objects, self.rejected, self.excluded))

    def counts(self) -> dict[str, int]:
        return {"objects": len(self.objects), "rejected": len(self.rejected), "excluded": len(self.excluded)}


def _sanitize(raw: str) -> str:
    from geco.data.schema import sanitize_object_id  # imports torch: only when listing

    return sanitize_object_id(raw)


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_list_hash(refs: list[ObjectRef]) -> str:
    """A hash of (id, content hash) of ``refs``, order-independent: same objects, same hash."""
    return _sha(sorted((r.object_id, r.content_hash) for r in refs))


def _rejected(object_id: str, uri: str, kind: str, reason: str, **extra) -> ObjectRef:
    return ObjectRef(object_id, uri, (), "", None, kind, {"reason": reason, **extra})


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def list_objects(cfg: SourceConfig) -> SourceListing:
    """List the objects of ``cfg``: see the module docstring for each kind and for the lists."""
    listers: dict[str, Callable[[SourceConfig], tuple[list[ObjectRef], list[ObjectRef]]]] = {
        "dir": _list_dir, "objaverse": _list_objaverse, "gso": _list_gso, "procedural": _list_procedural}
    refs, rejected = listers[cfg.kind](cfg)
    refs, dups = _dedupe(refs)
    rejected = sorted(rejected + dups, key=lambda r: r.object_id)
    banned = {x.strip().lower() for x in cfg.exclude_licenses}
    kept, excluded = [], []
    for r in sorted(refs, key=lambda r: r.object_id):
        if r.license is not None and r.license.strip().lower() in banned:
            excluded.append(ObjectRef(r.object_id, r.uri, r.sidecars, r.content_hash, r.license, r.source_kind,
                                      {**r.extra, "reason": f"licence {r.license!r} is in exclude_licenses"}))
        else:
            kept.append(r)
    if cfg.limit:
        kept = kept[: cfg.limit]
    return SourceListing(kept, rejected, excluded)


def fetch(ref: ObjectRef, cache) -> Path:
    """A local path of ``ref``'s main file (sidecars laid out beside it): ``cache.fetch(ref)``."""
    return cache.fetch(ref)


def _dedupe(refs: list[ObjectRef]) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Two source files with one id (``a.glb`` and ``a.obj``): the first by URI keeps it, the
    other is rejected, with an id made from its whole path so its failure record is unique too."""
    seen: dict[str, ObjectRef] = {}
    dups = []
    for r in sorted(refs, key=lambda r: r.uri):
        if r.object_id in seen:
            dups.append(_rejected(_sanitize(r.extra.get("path", r.uri)), r.uri, r.source_kind,
                                  f"duplicate object id {r.object_id!r}: also {seen[r.object_id].uri}; rename one"))
        else:
            seen[r.object_id] = r
    return list(seen.values()), dups


# ---------------------------------------------------------------------------------------------
# A file tree (local folder or S3 prefix) listed once, with sizes and digests
# ---------------------------------------------------------------------------------------------
@dataclass
class _File:
    uri: str
    size: int
    etag: str = ""  # S3 only


class _Tree:
    """All files under a root, keyed by POSIX path relative to it; hidden files skipped."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if storage.is_s3(root) else str(Path(root))
        self.s3 = storage.is_s3(root)
        self.files: dict[str, _File] = {}
        self._digests: dict[str, str] = {}
        if self.s3:
            storage.check_readable(root)
            bucket, key = storage.split_s3(self.root)
            prefix = key.rstrip("/") + "/" if key else ""
            pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/") and not _hidden(rel):
                        self.files[rel] = _File(f"s3://{bucket}/{obj['Key']}", obj["Size"],
                                                obj.get("ETag", "").strip('"'))
        else:
            base = Path(self.root)
            if not base.is_dir():
                raise SourceError(f"{root}: not a directory (source.uri must name a folder of objects)")
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    p = Path(dirpath) / name
                    rel = p.relative_to(base).as_posix()
                    if not _hidden(rel) and p.is_file():
                        self.files[rel] = _File(str(p), p.stat().st_size)

    def uri(self, rel: str) -> str:
        return self.files[rel].uri

    def read(self, rel: str, limit: int | None = None) -> bytes:
        f = self.files[rel]
        if self.s3:
            bucket, key = storage.split_s3(f.uri)
            kw = {"Range": f"bytes=0-{limit - 1}"} if limit and f.size > limit else {}
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
        return _sha([[rel, self.digest(rel)] for rel in [main, *sorted(sidecars)]], sorted((aliases or {}).items()))


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _ext(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return ("." + name.rsplit(".", 1)[1].lower()) if "." in name.lstrip(".") else ""


def _resolve(base_dir: str, ref: str) -> str:
    """A path written in a file (``..\\tex\\a.png``, percent-free) relative to ``base_dir``."""
    ref = ref.strip().strip('"').replace("\\", "/")
    return posixpath.normpath(posixpath.join(base_dir, ref)) if not posixpath.isabs(ref) else ref


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


def _obj_sidecars(tree: _Tree, rel: str, fallback: Callable[[str], str | None] | None = None
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
        candidates = [lib] if _resolve(obj_dir, lib) in tree.files else lib.split()
        for name in candidates:
            mtl = _resolve(obj_dir, name)
            if mtl not in tree.files:
                extra.setdefault("missing_materials", []).append(name)
                continue
            if mtl not in sidecars:
                sidecars.append(mtl)
            mtl_dir = posixpath.dirname(mtl)
            for tex in parse_mtl_textures(tree.read(mtl).decode("utf-8", "replace")):
                path = _resolve(mtl_dir, tex)
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


def _gltf_sidecars(tree: _Tree, rel: str) -> tuple[list[str], dict[str, Any]]:
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
        path = _resolve(base, urllib.parse.unquote(uri))
        if path in tree.files:
            if path not in sidecars:
                sidecars.append(path)
        else:
            extra.setdefault(key, []).append(uri)
    return sidecars, extra


def _object_ref(tree: _Tree, rel: str, object_id: str, kind: str, license: str | None = None,
                fallback: Callable[[str], str | None] | None = None, **extra) -> ObjectRef:
    ext = _ext(rel)
    if ext == ".obj":
        sidecars, notes = _obj_sidecars(tree, rel, fallback)
    elif ext == ".gltf":
        sidecars, notes = _gltf_sidecars(tree, rel)
    else:
        sidecars, notes = [], {}
    content = tree.content_hash(rel, sidecars, notes.get("aliases"))
    return ObjectRef(object_id, tree.uri(rel), tuple(tree.uri(s) for s in sidecars), content, license, kind,
                     {**extra, **notes})


# ---------------------------------------------------------------------------------------------
# dir
# ---------------------------------------------------------------------------------------------
def _list_dir(cfg: SourceConfig) -> tuple[list[ObjectRef], list[ObjectRef]]:
    tree = _Tree(cfg.uri)
    refs, sidecar_files = [], set()
    for rel in sorted(tree.files):
        if _ext(rel) in SUPPORTED_EXTENSIONS:
            stem = rel[: -len(_ext(rel))]
            ref = _object_ref(tree, rel, _sanitize(stem.replace("/", "-")), "dir", path=rel)
            refs.append(ref)
            sidecar_files.update(ref.sidecars)
    rejected = []
    supported = " ".join(SUPPORTED_EXTENSIONS)
    for rel, f in sorted(tree.files.items()):
        ext = _ext(rel)
        if ext in SUPPORTED_EXTENSIONS or ext in IGNORED_EXTENSIONS or f.uri in sidecar_files:
            continue
        what = f"unsupported extension {ext}" if ext else "unsupported file (no extension)"
        rejected.append(_rejected(_sanitize(rel), f.uri, "dir", f"{what}: supported are {supported}", path=rel))
    return refs, rejected


# ---------------------------------------------------------------------------------------------
# gso
# ---------------------------------------------------------------------------------------------
def _list_gso(cfg: SourceConfig) -> tuple[list[ObjectRef], list[ObjectRef]]:
    tree = _Tree(cfg.uri)
    names: dict[str, list[str]] = {}
    for rel in tree.files:
        top, _, rest = rel.partition("/")
        if rest:
            names.setdefault(top, []).append(rest)
    refs, rejected = [], []
    for name in sorted(names):
        main = f"{name}/meshes/model.obj"
        object_id = _sanitize(f"gso-{name}")
        if main not in tree.files:
            rejected.append(_rejected(object_id, tree.root + "/" + name, "gso",
                                      f"GSO layout: {name}/meshes/model.obj not found", name=name))
            continue

        def fallback(expected: str, name=name) -> str | None:
            for alt in (f"{name}/materials/textures/{posixpath.basename(expected)}",
                        f"{name}/materials/textures/texture.png"):
                if alt in tree.files:
                    return alt
            return None

        refs.append(_object_ref(tree, main, object_id, "gso", GSO_LICENSE, fallback, name=name))
    for rel, f in sorted(tree.files.items()):
        if "/" not in rel and _ext(rel) == ".zip":
            name = rel[:-4]
            if name not in names:
                rejected.append(_rejected(_sanitize(f"gso-{name}"), f.uri, "gso",
                                          f"GSO archive not extracted: unzip it into {name}/ "
                                          "(expected meshes/model.obj)", name=name))
    return refs, rejected


# ---------------------------------------------------------------------------------------------
# procedural
# ---------------------------------------------------------------------------------------------
def parse_procedural_uri(uri: str) -> tuple[int | None, int, str]:
    """``procedural://3?seed=7&format=obj`` -> (3, 7, "obj"); index None when absent; defaults
    seed 0, format glb. An empty string is the default source."""
    if not uri:
        return None, 0, "glb"
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "procedural":
        raise SourceError(f"{uri!r}: a procedural URI looks like procedural://<index>?seed=<seed>")
    q = urllib.parse.parse_qs(parsed.query)
    try:
        index = int(parsed.netloc) if parsed.netloc else None
        seed = int(q.get("seed", ["0"])[0])
    except ValueError:
        raise SourceError(f"{uri!r}: index and seed must be integers") from None
    fmt = q.get("format", ["glb"])[0]
    if fmt not in ("glb", "obj"):
        raise SourceError(f"{uri!r}: format must be glb or obj")
    return index, seed, fmt


def procedural_ref(index: int, seed: int = 0, fmt: str = "glb", width: int = 4) -> ObjectRef:
    from geco.data import procedural

    uri = f"procedural://{index}?seed={seed}" + ("&format=obj" if fmt == "obj" else "")
    return ObjectRef(
        procedural.procedural_id(index, width), uri, (),
        _sha("procedural", procedural.GENERATOR_VERSION, index, seed, fmt), None, "procedural",
        {"index": index, "seed": seed, "format": fmt, "shape": procedural.shape_of(index),
         "generator_version": procedural.GENERATOR_VERSION})


def _list_procedural(cfg: SourceConfig) -> tuple[list[ObjectRef], list[ObjectRef]]:
    _, seed, fmt = parse_procedural_uri(cfg.uri)
    n = cfg.num_procedural
    width = max(4, len(str(n - 1)))
    return [procedural_ref(i, seed, fmt, width) for i in range(n)], []


# ---------------------------------------------------------------------------------------------
# objaverse
# ---------------------------------------------------------------------------------------------
def read_uid_list(uri: str) -> list[str]:
    """UIDs from a text file: one per line, ``#`` comments, blank lines, ``.glb`` suffixes and
    duplicates dropped, order kept."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise SourceError(f"{uri}: UID list not found (source.uri for kind=objaverse)") from None
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


def _list_objaverse(cfg: SourceConfig) -> tuple[list[ObjectRef], list[ObjectRef]]:
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
    refs, rejected = [], []
    for uid in uids:
        if uid not in paths:
            rejected.append(_rejected(_sanitize(uid), f"objaverse:{uid}", "objaverse",
                                      "not an Objaverse 1.0 UID (not in object-paths.json.gz)", uid=uid))
            continue
        object_path = paths[uid]
        meta = annotations.get(uid, {})
        license = meta.get("license") or None
        extra = {"uid": uid, "object_path": object_path, "objaverse_cache": base}
        if meta.get("name"):
            extra["name"] = meta["name"]
        refs.append(ObjectRef(_sanitize(uid), f"{OBJAVERSE_HF_URL}/{object_path}", (),
                              _sha("objaverse-1.0", object_path), license, "objaverse", extra))
    return refs, rejected


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
    with open(locks / f"{_sanitize(uid)}.lock", "w") as lock:
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


def write_fake_objaverse_cache(base: str | Path, objects: dict[str, tuple[bytes, dict]],
                               group: str = "000-000") -> Path:
    """Test helper: an objaverse 0.1.7 cache with ``objects`` {uid: (glb bytes, annotation)} in the
    package's exact layout (``hf-objaverse-v1/object-paths.json.gz``,
    ``metadata/<group>.json.gz``, ``glbs/<group>/<uid>.glb``). Bytes of None = not downloaded."""
    root = Path(base) / "hf-objaverse-v1"
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "glbs" / group).mkdir(parents=True, exist_ok=True)
    paths = {uid: f"glbs/{group}/{uid}.glb" for uid in objects}
    with gzip.open(root / "object-paths.json.gz", "wt") as f:
        json.dump(paths, f)
    with gzip.open(root / "metadata" / f"{group}.json.gz", "wt") as f:
        json.dump({uid: {"uid": uid, **ann} for uid, (_, ann) in objects.items()}, f)
    for uid, (data, _) in objects.items():
        if data is not None:
            (root / paths[uid]).write_bytes(data)
    return root
