"""``procedural``: objects made by :mod:`geco.data.procedural`, generated where they render.

``num_procedural`` objects, ids ``procedural-0000``..., uri
``procedural://<index>?seed=<seed>[&format=obj]``: generated on the node that renders them (into
a cache entry), so no shared filesystem is needed. ``SourceConfig.uri`` may be empty or
``procedural://?seed=7&format=obj`` to pick the seed (default 0) and format (default glb).
Content hash from the generator version and the parameters. Detected (``source.kind: auto``)
for an empty URI or the ``procedural://`` scheme.
"""
from __future__ import annotations

import urllib.parse
from pathlib import Path

from geco.sources.base import ObjectRef, Source, SourceError, register, sha


def parse_procedural_uri(uri: str) -> tuple[int | None, int, str]:
    """``procedural://3?seed=7&format=obj`` -> (3, 7, "obj"); index None when absent; defaults
    seed 0, format glb. An empty string is the default source."""
    if not uri:
        return None, 0, "glb"
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "procedural":
        raise SourceError(f"{uri!r}: a procedural URI looks like procedural://<index>?seed=<seed> (source.kind "
                          "is procedural; for a folder, a GSO folder or a UID list set source.kind=auto)")
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
    from geco.data import procedural  # numpy + PIL: only when listing

    uri = f"procedural://{index}?seed={seed}" + ("&format=obj" if fmt == "obj" else "")
    return ObjectRef(
        procedural.procedural_id(index, width), uri, (),
        sha("procedural", procedural.GENERATOR_VERSION, index, seed, fmt), None, "procedural",
        {"index": index, "seed": seed, "format": fmt, "shape": procedural.shape_of(index),
         "generator_version": procedural.GENERATOR_VERSION})


class ProceduralSource(Source):
    kind = "procedural"
    detect_order = 10

    def detect(self, uri: str) -> bool:
        return not uri or urllib.parse.urlsplit(uri).scheme == "procedural"

    def list(self, cfg) -> tuple[list[ObjectRef], list[ObjectRef]]:
        _, seed, fmt = parse_procedural_uri(cfg.uri)
        n = cfg.num_procedural
        width = max(4, len(str(n - 1)))
        return [procedural_ref(i, seed, fmt, width) for i in range(n)], []

    def build(self, ref: ObjectRef, out: Path) -> str:
        from geco.data.procedural import make_procedural

        index, seed, fmt = parse_procedural_uri(ref.uri)
        return make_procedural(index, seed, out, fmt).relative_to(out).as_posix()


register(ProceduralSource())
