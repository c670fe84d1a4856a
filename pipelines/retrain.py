"""Scheduled retraining (`geco retrain`): what changed in the source, and a DAG run that takes it in.

One retraining run, under the lease ``<dataset.uri>/leases/retrain.json`` (:mod:`geco.lease`; a
second run that overlaps exits cleanly saying who holds it and until when)::

    source_changes   the source now against the dataset's latest manifest version (below)
    production       models:/<registry.model_name>@<registry.production_alias>: its bundle and the
                     dataset version it was trained on (the version's geco.lineage.dataset_manifest_uri)
    nothing to do    when nothing is to render and production was trained on the latest version
    the DAG          retrain.stages (default render, stage1, pseudo_gt, stage2, evaluate, register) as one
                     MLflow run `<name>/retrain` (pipelines.dag.run), with
                       render     only the added and changed objects: new shards and a new manifest
                                  version that references the old shards
                       stage1     continuing from production's generator (models.generator.pretrained)
                       pseudo_gt  incremental: only objects without pseudo-GT for this teacher
                       stage2     from this run's stage-1 bundle
                       evaluate   the GSO evaluation of the new bundles
                       register   the candidate; production moves only under registry's rule
                                  (geco.registry.decide: no gated metric worse than production's by
                                  more than registry.tolerance), else it stays and the run says why
                     each stage starts only while the lease is still ours (Lease.check)
    training outputs <retrain.output_uri>/<key>/ (stage1/, stage2/, train/, evaluate/), the key naming
                     the production version and the listing: a failed retraining re-run resumes from
                     its checkpoints; two retrainings never share a checkpoint

Exit status (:attr:`RetrainOutputs.exit_status`): 0 when production moved, when there was nothing to
do, or when another run holds the lease; :data:`KEPT` (3) when the candidate was registered but
production stayed (a regression, or registry.promote: never) - a scheduler sees it without parsing.

What changed (:func:`source_changes`)::

    listing = the source as it is now (local folder, S3 prefix, UID list, procedural)
    latest  = the dataset's latest manifest: {object id: render hash} of its current samples
    added   = in the listing, not in the manifest
    changed = in both, with another render hash (the object's bytes or the render settings changed)
    removed = in the manifest, no longer in the listing (kept in the dataset: shards are immutable)
    todo    = what the render stage itself would render now (``pipelines.render.plan``: same hashes,
              same handling of objects that failed before)

The render hash (``pipelines.render.render_hash``) covers the object's content hash *and* the render
settings, so changed render settings make every object "changed" (``settings_changed`` says why):
every object renders again into new shards and a new manifest version, and the old versions stay
untouched, so runs trained on them stay reproducible.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from geco import storage
from geco.config import GecoConfig, apply_overrides
from geco.data import shards
from geco.lease import Lease, LeaseHeld, lease_uri
from geco.models.bundle import resolve_checkpoint
from geco.registry import version_by_alias
from geco.sources import ObjectRef, list_objects
from geco.tracking import Tracker, redact_uri
from pipelines import dag, render
from pipelines.stage import StageOutputs

STAGE = "retrain"
KEPT = 3  # exit status: the candidate was registered, production stayed
TRAINED_ON_TAG = "geco.lineage.dataset_manifest_uri"  # on a model version: the dataset version it was trained on
log = logging.getLogger(__name__)


class RetrainError(RuntimeError):
    """A retraining cannot start (no production model to continue from, no registry): one line."""


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
    hashes: dict[str, str] = field(default_factory=dict)  # object id -> render hash, for the whole listing
    latest_manifest_uri: str | None = None  # the dataset's latest manifest version (None: no dataset yet)

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
        todo=todo, previously_failed=previously_failed, source=listing.describe(), hashes=hashes,
        latest_manifest_uri=shards.manifest_uri(out, latest["version"]) if latest else None)
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


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class RetrainOutputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: the DAG run's, as ``<stage>.<name>``) plus what the
    retraining decided."""

    stage: str = STAGE
    changes: SourceChanges | None = None
    held_by: str = ""  # another run holds the lease: who and until when (nothing was done)
    production_version: str = ""  # the version this run continued from
    key: str = ""  # <retrain.output_uri>/<key>/: this run's training outputs
    dag: Any = None  # the DAG run's DagOutputs
    promoted: bool | None = None  # production moved to the candidate (None: nothing registered)
    why: str = ""  # why production moved or stayed; why nothing was done
    model_uri: str = ""  # the candidate's models:/<name>/<version>

    @property
    def exit_status(self) -> int:
        """0: production moved, or nothing to do, or another run holds the lease; :data:`KEPT`: the
        candidate was registered and production stayed."""
        return KEPT if self.promoted is False else 0

    def note(self) -> str:
        if self.held_by:
            return f"skipped: {self.held_by}"
        if self.dag is None:
            return f"nothing to do: {self.why}"
        if self.promoted is None:
            return f"trained from version {self.production_version}; nothing registered ({self.why})"
        return (f"{self.model_uri} from version {self.production_version}: production "
                f"{'-> this version' if self.promoted else 'stays'} ({self.why})")

    def summary(self) -> str:
        lines = [f"retrain: {self.note()} in {self.seconds:.1f} s"]
        if self.key:
            lines.append(f"  outputs: {self.key}")
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        if self.promoted is False:
            lines.append(f"  exit status {KEPT}: the candidate is registered, production did not move")
        return "\n".join(lines)


def retrain_key(production_version: str, hashes: dict[str, str]) -> str:
    """``from-v<version>-<digest of the listing's render hashes>``: the same retraining (same start,
    same source) gets the same key, so a re-run resumes its checkpoints; any other gets its own."""
    digest = hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:12]
    return f"from-v{production_version}-{digest}"


def retrain_root(cfg: GecoConfig, key: str) -> str:
    """``<retrain.output_uri>/<key>``: where one retraining's training outputs go."""
    return storage.join(storage.absolute_uri(cfg.retrain.output_uri), key)


def retrain_config(cfg: GecoConfig, key: str, generator_uri: str) -> GecoConfig:
    """``cfg`` for the DAG of one retraining: the generator starts from ``generator_uri`` (production's),
    and the training outputs, checkpoints and evaluation go under :func:`retrain_root`."""
    root = retrain_root(cfg, key)
    overrides = [f"models.generator.pretrained={generator_uri}",
                 f"stage1.output_uri={storage.join(root, 'stage1')}", f"stage2.output_uri={storage.join(root, 'stage2')}",
                 f"stage1.train.storage_path={storage.join(root, 'train')}",
                 f"stage2.train.storage_path={storage.join(root, 'train')}",
                 f"evaluate.output_uri={storage.join(root, 'evaluate')}"]
    return GecoConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), overrides))


def run(cfg: GecoConfig, *, force: bool = False, progress: Callable[[str], None] | None = None) -> RetrainOutputs:
    """One retraining (module docstring). ``force``: train and evaluate even when nothing changed.
    ``progress`` receives the source changes and each stage's summary as they come (the CLI prints them).

    Raises :class:`RetrainError` (no registry, no production version), what listing the source
    raises, :class:`pipelines.dag.StageFailed` for a failed stage, :class:`geco.lease.LeaseLost` when
    another run took the lease over."""
    t0 = time.perf_counter()
    if not cfg.tracking.enabled:
        raise RetrainError("retrain: tracking.enabled is false, but retraining starts from the production model in "
                           "MLflow's registry and moves its alias; set tracking.enabled=true (and tracking.uri)")
    lease = Lease(lease_uri(cfg.dataset.uri, STAGE), ttl_s=cfg.retrain.lease_ttl_s)
    try:
        with lease:
            out = _retrain(cfg, lease, force, progress or (lambda _text: None))
    except LeaseHeld as e:
        out = RetrainOutputs(did_work=False, held_by=str(e))
    out.seconds = time.perf_counter() - t0
    log.info("retrain: %s", out.note())
    return out


def _retrain(cfg: GecoConfig, lease: Lease, force: bool, progress: Callable[[str], None]) -> RetrainOutputs:
    from mlflow import MlflowClient  # lazy: MLflow takes seconds to import

    changes = source_changes(cfg)
    progress(changes.summary())
    reg = cfg.registry
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    production = version_by_alias(client, reg.model_name, reg.production_alias)
    if production is None:
        raise RetrainError(f"retrain: no models:/{reg.model_name}@{reg.production_alias} to continue from; run the "
                           f"whole DAG first (`geco run --config ...` registers one)")
    version = str(production.version)
    trained_on = production.tags.get(TRAINED_ON_TAG, "")
    latest = redact_uri(changes.latest_manifest_uri) if changes.latest_manifest_uri else ""
    if not force and not changes.any and trained_on == latest:
        return RetrainOutputs(did_work=False, changes=changes, production_version=version,
                              why=f"no object added or changed, and production (version {version}) was trained on "
                                  f"the latest dataset version {latest}")

    key = retrain_key(version, changes.hashes)
    bundle = resolve_checkpoint(f"models:/{reg.model_name}/{version}", tracking_uri=cfg.tracking.uri)
    run_cfg = retrain_config(cfg, key, str(bundle / "generator"))
    tags = {"geco.retrain.key": key, "geco.retrain.from_version": version,
            "geco.retrain.from_trained_on": trained_on or "unknown", "geco.retrain.added": str(len(changes.added)),
            "geco.retrain.changed": str(len(changes.changed)), "geco.retrain.removed": str(len(changes.removed)),
            "geco.retrain.to_render": str(len(changes.todo))}
    result = dag.run(run_cfg, stages=cfg.retrain.stages, progress=progress, before_stage=lambda _stage: lease.check(),
                     run_name=f"{cfg.name}/{STAGE}", tags=tags)
    out = RetrainOutputs(changes=changes, production_version=version, key=retrain_root(cfg, key), dag=result,
        uris={f"{s}.{name}": uri for s, r in result.stages.items() for name, uri in r.uris.items()},
        mlflow_run_ids={STAGE: result.mlflow_run_id} if result.mlflow_run_id else {})
    registered = result.stages.get("register")
    if registered is None:
        out.why = "register is not in retrain.stages"
    else:
        reg_out = registered.outputs
        out.promoted, out.why, out.model_uri = reg_out.promoted, reg_out.why, reg_out.model_uri or ""
        if not out.promoted:
            log.warning("retrain: production stays version %s: %s", version, reg_out.why)
    Tracker.attach(cfg.tracking.uri, result.mlflow_run_id).set_tags({
        "geco.retrain.promoted": "none" if out.promoted is None else str(out.promoted).lower(),
        "geco.retrain.why": out.why[:5000], "geco.retrain.model_uri": out.model_uri})
    return out
