"""What every object source shares: the object record, the listing, hashing and the registry.

A source *kind* is one subclass of :class:`Source` in its own module, registered with
:func:`register`. It knows three things about its objects and nothing else:

* ``list(cfg)`` — ``(objects, rejected)`` for a :class:`~geco.config.SourceConfig` whose ``uri``
  is already resolved (local paths absolute); :func:`list_objects` adds the licence filter,
  ``limit`` and de-duplication for every kind;
* ``detect(uri)`` — whether ``uri`` looks like this kind (for ``source.kind: auto``); kinds are
  tried in ``detect_order``;
* ``local_path(ref)`` / ``build(ref, out)`` — how a renderer gets a local file: a path usable in
  place, or ``None`` and then ``build`` fills a fresh folder of the object cache
  (:mod:`geco.data.cache`) and returns the main file's path relative to it.

Failure words: :class:`SourceError` is a source that cannot be listed (the user fixes the
config); :class:`UnsafePath` is one object whose files would leave its folder (a property of the
object: recorded as a failure, never retried).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from geco import storage
from geco.storage import absolute_uri, has_scheme

if TYPE_CHECKING:
    from geco.config import SourceConfig

AUTO = "auto"


class SourceError(RuntimeError):
    """A source that cannot be listed at all (missing folder, unreadable UID list, no network)."""


class UnsafePath(SourceError):
    """An object's file path leaves its folder or prefix (``../``, an absolute path)."""


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
    """The result of :func:`list_objects`; every list is sorted by ``object_id``. ``kind`` is the
    kind that listed them and ``inferred`` whether it was detected from the URI (``auto``)."""

    objects: list[ObjectRef]
    rejected: list[ObjectRef] = field(default_factory=list)
    excluded: list[ObjectRef] = field(default_factory=list)
    kind: str = ""
    uri: str = ""
    inferred: bool = False

    def __iter__(self):
        """``objects, rejected, excluded = list_objects(cfg)`` (all three are lists of ObjectRef)."""
        return iter((self.objects, self.rejected, self.excluded))

    def counts(self) -> dict[str, int]:
        return {"objects": len(self.objects), "rejected": len(self.rejected), "excluded": len(self.excluded)}

    def describe(self) -> str:
        """``source: dir (detected) /abs/objs`` — which kind listed what, for logs and summaries."""
        how = "detected from the URI; set source.kind to choose" if self.inferred else "source.kind"
        return f"source: {self.kind} ({how}) {self.uri}".rstrip()


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def sanitize(raw: str) -> str:
    from geco.data.schema import sanitize_object_id  # imports torch: only when listing

    return sanitize_object_id(raw)


def sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_list_hash(refs: list[ObjectRef]) -> str:
    """A hash of (id, content hash) of ``refs``, order-independent: same objects, same hash."""
    return sha(sorted((r.object_id, r.content_hash) for r in refs))


def rejected(object_id: str, uri: str, kind: str, reason: str, **extra) -> ObjectRef:
    return ObjectRef(object_id, uri, (), "", None, kind, {"reason": reason, **extra})


# ---------------------------------------------------------------------------------------------
# Kinds and the registry
# ---------------------------------------------------------------------------------------------
class Source:
    """One kind of object source; subclass it in one module and :func:`register` an instance."""

    kind: ClassVar[str] = ""
    #: auto-detection order (lower first); ``None``: never detected, only chosen explicitly
    detect_order: ClassVar[int | None] = None

    def list(self, cfg: SourceConfig) -> tuple[list[ObjectRef], list[ObjectRef]]:
        raise NotImplementedError

    def detect(self, uri: str) -> bool:
        return False

    def local_path(self, ref: ObjectRef) -> Path | None:
        """A local file of ``ref`` usable in place, or None (the cache calls :meth:`build`)."""
        return None

    def build(self, ref: ObjectRef, out: Path) -> str:
        """Write ``ref``'s files into the empty folder ``out``; the main file's path relative to it."""
        raise NotImplementedError(f"source kind {self.kind!r} cannot build cache entries")


KINDS: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Make ``source`` a kind of ``source.kind`` (and of auto-detection, if it has a ``detect_order``)."""
    KINDS[source.kind] = source
    return source


def kind_of(ref: ObjectRef) -> Source:
    try:
        return KINDS[ref.source_kind]
    except KeyError:
        raise SourceError(f"{ref.object_id}: unknown source kind {ref.source_kind!r} "
                          f"(known: {', '.join(sorted(KINDS))})") from None


def infer_kind(uri: str) -> str:
    """The kind ``uri`` looks like (see each kind's ``detect``), or a one-line SourceError."""
    for source in sorted((s for s in KINDS.values() if s.detect_order is not None), key=lambda s: s.detect_order):
        if source.detect(uri):
            return source.kind
    if not storage.is_s3(uri) and not has_scheme(uri):
        if not Path(uri).exists():
            raise SourceError(f"{uri}: no such file or directory (source.uri)")
        if Path(uri).is_file():
            raise SourceError(f"{uri} is a file, not a source: give a folder of .glb/.gltf/.obj files, a GSO "
                              "folder, or a .txt/.csv file of Objaverse UIDs")
    raise SourceError(f"{uri}: cannot tell what kind of source this is; set source.kind to one of "
                      f"{', '.join(sorted(KINDS))}")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def list_objects(cfg: SourceConfig) -> SourceListing:
    """List the objects of ``cfg``: see :mod:`geco.sources` for each kind and for the lists."""
    uri = absolute_uri(cfg.uri)
    inferred = cfg.kind == AUTO
    kind = infer_kind(uri) if inferred else cfg.kind
    if kind not in KINDS:
        raise SourceError(f"source.kind={kind!r} is not a source kind (known: auto, {', '.join(sorted(KINDS))})")
    refs, rejects = KINDS[kind].list(cfg.model_copy(update={"uri": uri, "kind": kind}))
    refs, dups = _dedupe(refs)
    rejects = sorted(rejects + dups, key=lambda r: r.object_id)
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
    return SourceListing(kept, rejects, excluded, kind=kind, uri=uri, inferred=inferred)


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
            dups.append(rejected(sanitize(r.extra.get("path", r.uri)), r.uri, r.source_kind,
                                 f"duplicate object id {r.object_id!r}: also {seen[r.object_id].uri}; rename one"))
        else:
            seen[r.object_id] = r
    return list(seen.values()), dups
