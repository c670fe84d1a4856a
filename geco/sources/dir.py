"""``dir``: a local folder or ``s3://`` prefix of ``.glb`` / ``.gltf`` / ``.obj`` files.

Searched recursively. The id is the path relative to the root, without the extension, ``/`` ->
``-``, then :func:`geco.data.schema.sanitize_object_id` (``chairs/red.glb`` -> ``chairs-red``).
Sidecars, confinement (to the root) and the content hash: :mod:`geco.sources.files`.
Zero-byte or broken files are still listed: the renderer records the reason. Images, ``.mtl``,
``.bin``, hidden files and metadata/doc files (:data:`~geco.sources.files.IGNORED_EXTENSIONS`)
are not objects and are ignored; any other file is ``rejected``, and so is an object whose
references leave the root. Detected (``source.kind: auto``) for any folder or ``s3://`` prefix
that no earlier kind claims.
"""
from __future__ import annotations

from pathlib import Path

from geco import storage
from geco.sources.base import ObjectRef, UnsafePath, has_scheme, register, rejected, sanitize
from geco.sources.files import IGNORED_EXTENSIONS, SUPPORTED_EXTENSIONS, FileSource, FileTree, ext, object_ref


class DirSource(FileSource):
    kind = "dir"
    detect_order = 90  # the catch-all for folders and prefixes

    def detect(self, uri: str) -> bool:
        if storage.is_s3(uri):
            return ext(uri.rstrip("/")) not in (".txt", ".csv")
        return not has_scheme(uri) and Path(uri).is_dir()

    def list(self, cfg) -> tuple[list[ObjectRef], list[ObjectRef]]:
        tree = FileTree(cfg.uri)
        refs, rejects, sidecar_files = [], [], set()
        for rel in sorted(tree.files):
            suffix = ext(rel)
            if suffix in SUPPORTED_EXTENSIONS:
                object_id = sanitize(rel[: -len(suffix)].replace("/", "-"))
                try:
                    ref = object_ref(tree, rel, object_id, "dir", path=rel)
                except UnsafePath as e:
                    rejects.append(rejected(object_id, tree.uri(rel), "dir", str(e), path=rel))
                    continue
                refs.append(ref)
                sidecar_files.update(ref.sidecars)
        supported = " ".join(SUPPORTED_EXTENSIONS)
        for rel, f in sorted(tree.files.items()):
            suffix = ext(rel)
            if suffix in SUPPORTED_EXTENSIONS or suffix in IGNORED_EXTENSIONS or f.uri in sidecar_files:
                continue
            what = f"unsupported extension {suffix}" if suffix else "unsupported file (no extension)"
            rejects.append(rejected(sanitize(rel), f.uri, "dir", f"{what}: supported are {supported}", path=rel))
        for rel, uri in sorted(tree.unsafe.items()):
            rejects.append(rejected(sanitize(rel.replace("..", "_")), uri, "dir",
                                    f"unsafe key {rel!r}: '.'/'..' segments would leave the source prefix",
                                    path=rel))
        return refs, rejects


register(DirSource())
