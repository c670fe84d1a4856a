"""Scheduled retraining: what changed in the source since the last dataset version.

A retraining run (``geco retrain``) renders only the objects that are new or changed since the
dataset's latest manifest version, into new shards and a new manifest version that references the
old shards, then continues training from the current ``production`` model. This module holds the
first decision, :func:`source_changes`:

    listing = the source as it is now (local folder, S3 prefix, UID list, procedural)
    latest  = the dataset's latest manifest: {object id: render hash} of its current samples
    added   = in the listing, not in the manifest
    changed = in both, with another render hash (the object's bytes or the render settings changed)
    removed = in the manifest, no longer in the listing (kept in the dataset: shards are immutable)
    todo    = what the render stage itself would render now (``pipelines.render.plan``: same hashes,
              same handling of objects that failed before)

The render hash (``pipelines.render.render_hash``) covers the object's content hash *and* the render
settings, so changed render settings make every object "changed" (``settings_changed`` says why);
such a regeneration goes to a new dataset URI, leaving the old version untouched, so runs trained on
it stay reproducible. Nothing here renders, trains or starts Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from geco.config import GecoConfig
from geco.data import shards
from geco.sources import ObjectRef, list_objects
from pipelines import render


@dataclass
class SourceChanges:
    """The source against the dataset's latest manifest version (see the module docstring)."""

    dataset_uri: str
    manifest_version: int | None  # None: no dataset yet (everything is added)
    settings_changed: bool  # the render settings differ from the ones of the latest manifest
    added: list[ObjectRef] = field(default_factory=list)
    changed: list[ObjectRef] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # object ids
    removed: list[str] = field(default_factory=list)  # object ids in the manifest, gone from the source
    todo: list[ObjectRef] = field(default_factory=list)  # what render would render now
    previously_failed: int = 0  # skipped: failed before with the same hash (render's --retry-failed)
    source: str = ""  # the listing, described

    @property
    def any(self) -> bool:
        return bool(self.todo)

    def summary(self) -> str:
        version = f"manifest v{self.manifest_version:06d}" if self.manifest_version else "no manifest yet"
        lines = [f"source changes since {version} of {self.dataset_uri}: {len(self.added)} added, "
                 f"{len(self.changed)} changed, {len(self.unchanged)} unchanged, {len(self.removed)} removed "
                 f"(kept); {len(self.todo)} to render, {self.previously_failed} failed before"]
        if self.settings_changed:
            lines.append("  the render settings changed: every object renders again (write it to a new "
                         "dataset.uri to keep the old version reproducible)")
        if self.source:
            lines.append(f"  {self.source}")
        return "\n".join(lines)


def source_changes(cfg: GecoConfig, *, dataset_uri: str | None = None) -> SourceChanges:
    """List ``cfg.source`` and compare it with the latest manifest version at ``dataset_uri``
    (default ``cfg.dataset.uri``) by render hash. Raises what listing the source raises
    (:class:`geco.sources.SourceError`, :class:`geco.storage.StorageError`)."""
    out = dataset_uri or cfg.dataset.uri
    listing = list_objects(cfg.source)
    refs = listing.objects
    latest = shards.read_latest_manifest(out)
    in_manifest: dict[str, str] = {}
    if latest is not None:
        current = shards.current_samples(latest)
        for shard in latest["shards"]:
            for s in shard["samples"]:
                if s["key"] in current.get(shard["name"], ()):
                    in_manifest[s.get("object_id", s["key"])] = s["content_hash"]
    hashes = {r.object_id: render.render_hash(r, cfg.render) for r in refs}
    prev_failures = {r["object_id"]: r for r in shards.read_failures(out)} if latest is not None else {}
    todo, _, previously_failed = render.plan(refs, hashes, in_manifest, prev_failures)
    changes = SourceChanges(
        dataset_uri=out, manifest_version=latest["version"] if latest else None,
        settings_changed=bool(latest) and latest.get("settings_hash") != cfg.render.settings_hash(),
        todo=todo, previously_failed=previously_failed, source=listing.describe())
    for ref in refs:
        known = in_manifest.get(ref.object_id)
        if known is None:
            changes.added.append(ref)
        elif known != hashes[ref.object_id]:
            changes.changed.append(ref)
        else:
            changes.unchanged.append(ref.object_id)
    listed = set(hashes)
    changes.removed = sorted(oid for oid in in_manifest if oid not in listed)
    return changes
