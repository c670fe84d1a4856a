"""Object sources: what there is to render, as a sorted list of :class:`ObjectRef`.

``list_objects(cfg)`` returns a :class:`SourceListing` with three sorted lists:

* ``objects`` — what to render (licence filter and ``limit`` applied);
* ``rejected`` — things the source offers that can never render, each with
  ``ref.reason``: files with an unsupported extension (``"unsupported extension .fbx: supported
  are .glb .gltf .obj"``), Objaverse UIDs that do not exist, GSO folders without
  ``meshes/model.obj``, two files that map to the same object id, objects whose files would
  leave their folder (``mtllib ../../x``). The render stage writes them to its failures table as
  they are, without sending them to a renderer. They are never cut by ``limit`` (a cheap
  record, and the user should see them).
* ``excluded`` — objects dropped on purpose because their licence is in ``exclude_licenses``
  (``ref.reason`` says which); counted and logged, not failures.

One module per kind (``SourceConfig.kind``), each owning its listing and its fetching:
:mod:`~geco.sources.dir` (a local folder or ``s3://`` prefix of models),
:mod:`~geco.sources.gso` (Google Scanned Objects), :mod:`~geco.sources.objaverse` (a UID list),
:mod:`~geco.sources.procedural` (generated in code). Shared pieces live in
:mod:`~geco.sources.base` (the record, the registry, :func:`list_objects`) and
:mod:`~geco.sources.files` (file trees and sidecars). A new kind is one new module with a
:class:`Source` subclass, registered with :func:`register` and imported below.

``kind: auto`` (the default) detects the kind from the URI: empty or ``procedural://`` ->
procedural; a ``.txt``/``.csv`` file -> objaverse; a folder or prefix whose top-level folders
hold ``meshes/model.obj`` -> gso; any other folder or prefix -> dir. A local file that none of
them takes is a one-line :class:`SourceError`. :attr:`SourceListing.kind` says what was chosen.

Local paths are made absolute when the source is listed (renderers run in another working
directory), so every ``ref.uri`` of a local source is absolute.

Licence filter: ``exclude_licenses`` entries are compared to ``ref.license`` case-insensitively
and exactly (``by-nc`` does not exclude ``by-nc-sa``; list both). Objects without a licence are
never excluded. ``limit`` then keeps the first ``limit`` objects in id order.
"""
from __future__ import annotations

# Each kind's module registers it when imported: dir here, the others through the names below.
from geco.sources import dir as _dir  # noqa: F401
from geco.sources.base import (
    AUTO,
    KINDS,
    ObjectRef,
    Source,
    SourceError,
    SourceListing,
    UnsafePath,
    absolute_uri,
    fetch,
    infer_kind,
    kind_of,
    list_objects,
    register,
    source_list_hash,
)
from geco.sources.files import (
    IGNORED_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    TEXTURE_EXTENSIONS,
    parse_mtl_textures,
    parse_obj_mtllibs,
)
from geco.sources.gso import GSO_LICENSE
from geco.sources.objaverse import OBJAVERSE_HF_URL, fetch_objaverse, objaverse_base, read_uid_list
from geco.sources.procedural import parse_procedural_uri, procedural_ref

__all__ = [
    "AUTO", "GSO_LICENSE", "IGNORED_EXTENSIONS", "KINDS", "OBJAVERSE_HF_URL", "SUPPORTED_EXTENSIONS",
    "TEXTURE_EXTENSIONS", "ObjectRef", "Source", "SourceError", "SourceListing", "UnsafePath", "absolute_uri",
    "fetch", "fetch_objaverse", "infer_kind", "kind_of", "list_objects", "objaverse_base", "parse_mtl_textures",
    "parse_obj_mtllibs", "parse_procedural_uri", "procedural_ref", "read_uid_list", "register",
    "source_list_hash",
]
