"""Leakage: no evaluation object may be in the training data, by content or by name.

The training data is a shard dataset (geco/data/shards.py). Its manifest lists every sample's key
(the object id) and the hash that decided its render: ``sha256("<object content hash>:<render
settings hash>")[:24]`` (``pipelines.render.render_hash``), with the settings hash of each render
run in the manifest versions. So an evaluation object is found in the training data when

* **content**: its own content hash, combined with any settings hash the dataset was ever rendered
  with, equals a training sample's hash (the same bytes, whatever the object was called), or
* **name**: its name equals a training key's name, compared without the source prefix (``gso-``,
  ``procedural-`` ...), case and punctuation (``gso-CHICKEN_NESTING`` ~ ``chicken-nesting``).

The result is ``{"clean", "checked", "names", "hashes", "detail"}``; ``clean`` is True only when
the check ran and found nothing. No training manifest (nothing to check against) is **not**
clean: ``checked`` False, and the detail says so.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

__all__ = ["check_leakage", "normalise_name"]

_PREFIXES = ("gso-", "procedural-", "objaverse-", "dir-")


def normalise_name(name: str) -> str:
    """``gso-CHICKEN_NESTING`` -> ``chickennesting``: no source prefix, lower case, letters and digits."""
    n = name.strip().lower()
    for p in _PREFIXES:
        if n.startswith(p):
            n = n[len(p):]
            break
    return re.sub(r"[^a-z0-9]+", "", n)


def check_leakage(objects: Iterable[Mapping[str, str]], manifests: list[Mapping], sample_hash: Callable[[str, str], str],
                  dataset_uri: str = "") -> dict:
    """``objects``: ``{"object_id", "name", "content_hash"}`` per evaluation object; ``manifests``:
    every manifest version of the training dataset (oldest first; the last lists every sample);
    ``sample_hash(content_hash, settings_hash)``: the render hash rule. See the module docstring."""
    objects = list(objects)
    if not manifests:
        return {"clean": False, "checked": False, "names": [], "hashes": [],
                "detail": f"not checked: no training manifest at {dataset_uri or '(no dataset given)'}"}
    latest = manifests[-1]
    samples = [s for shard in latest.get("shards", []) for s in shard.get("samples", [])]
    train_hashes = {s.get("content_hash") for s in samples if s.get("content_hash")}
    train_names = {normalise_name(str(s.get("key", ""))): str(s.get("key", "")) for s in samples}
    settings = {m.get("settings_hash") for m in manifests if m.get("settings_hash")}
    by_name, by_hash = [], []
    for o in objects:
        if o.get("content_hash") and any(sample_hash(o["content_hash"], s) in train_hashes for s in settings):
            by_hash.append(o["object_id"])
        n = normalise_name(o.get("name") or o["object_id"])
        if n and n in train_names:
            by_name.append(f"{o['object_id']} ~ {train_names[n]}")
    clean = not by_name and not by_hash
    detail = (f"clean: none of {len(objects)} evaluation object(s) is among the {len(samples)} training sample(s) "
              f"of {dataset_uri} (content hash over {len(settings)} render setting(s), and name)") if clean else (
        f"LEAKAGE: {len(set(by_hash) | {x.split(' ~ ')[0] for x in by_name})} evaluation object(s) in the training "
        f"data {dataset_uri}: " + "; ".join([f"same content: {', '.join(by_hash)}"] * bool(by_hash)
                                            + [f"same name: {', '.join(by_name)}"] * bool(by_name)))
    return {"clean": clean, "checked": True, "names": by_name, "hashes": by_hash, "detail": detail}
