"""``gso``: a Google Scanned Objects folder (local or ``s3://``).

Layout ``<name>/meshes/model.obj`` + ``model.mtl`` + ``<name>/materials/textures/texture.png``;
id ``gso-<name>``; licence ``CC-BY-4.0``. GSO's ``model.mtl`` says ``map_Kd texture.png``
(beside the mesh) while the file lies in ``materials/textures/``: ``extra["aliases"]`` maps the
path the ``.mtl`` expects (relative to the mesh's folder) to the real file, and the object cache
lays it out so Blender finds the texture. Unextracted ``<name>.zip`` archives are ``rejected``;
so is an object whose references leave ``<name>/``. Detected (``source.kind: auto``) when a
top-level folder holds ``meshes/model.obj``.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from geco import storage
from geco.sources.base import ObjectRef, UnsafePath, has_scheme, register, rejected, sanitize
from geco.sources.files import FileSource, FileTree, ext, object_ref

GSO_LICENSE = "CC-BY-4.0"
_MAIN = re.compile(r"[^/]+/meshes/model\.obj")
# Keys looked at to recognise the layout on S3 (each GSO object has a handful of files).
_DETECT_KEYS = 1000


class GsoSource(FileSource):
    kind = "gso"
    detect_order = 50

    def detect(self, uri: str) -> bool:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""
            with storage.s3_errors(uri, missing="bucket"):
                page = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=_DETECT_KEYS)
            return any(_MAIN.fullmatch(o["Key"][len(prefix):]) for o in page.get("Contents", []))
        return not has_scheme(uri) and Path(uri).is_dir() and any(Path(uri).glob("*/meshes/model.obj"))

    def list(self, cfg) -> tuple[list[ObjectRef], list[ObjectRef]]:
        tree = FileTree(cfg.uri)
        names: dict[str, list[str]] = {}
        for rel in tree.files:
            top, _, rest = rel.partition("/")
            if rest:
                names.setdefault(top, []).append(rest)
        refs, rejects = [], []
        for name in sorted(names):
            main = f"{name}/meshes/model.obj"
            object_id = sanitize(f"gso-{name}")
            if main not in tree.files:
                rejects.append(rejected(object_id, tree.root + "/" + name, "gso",
                                        f"GSO layout: {name}/meshes/model.obj not found", name=name))
                continue

            def fallback(expected: str, name=name) -> str | None:
                for alt in (f"{name}/materials/textures/{posixpath.basename(expected)}",
                            f"{name}/materials/textures/texture.png"):
                    if alt in tree.files:
                        return alt
                return None

            try:
                refs.append(object_ref(tree, main, object_id, "gso", GSO_LICENSE, fallback, folder=name, name=name))
            except UnsafePath as e:
                rejects.append(rejected(object_id, tree.uri(main), "gso", str(e), name=name))
        for rel, f in sorted(tree.files.items()):
            if "/" not in rel and ext(rel) == ".zip":
                name = rel[:-4]
                if name not in names:
                    rejects.append(rejected(sanitize(f"gso-{name}"), f.uri, "gso",
                                            f"GSO archive not extracted: unzip it into {name}/ "
                                            "(expected meshes/model.obj)", name=name))
        return refs, rejects


register(GsoSource())
