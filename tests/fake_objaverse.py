"""A fake on-disk cache of the ``objaverse`` package (0.1.7), so Objaverse sources list and fetch
without a network."""
from __future__ import annotations

import gzip
import json
from pathlib import Path


def write_fake_objaverse_cache(base: str | Path, objects: dict[str, tuple[bytes, dict]],
                               group: str = "000-000") -> Path:
    """An objaverse 0.1.7 cache with ``objects`` {uid: (glb bytes, annotation)} in the package's
    exact layout (``hf-objaverse-v1/object-paths.json.gz``, ``metadata/<group>.json.gz``,
    ``glbs/<group>/<uid>.glb``). Bytes of None = not downloaded."""
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
