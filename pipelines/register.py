"""DAG stage `register`: the final bundle becomes a version of the registered model, with its metrics.

    inputs: RegisterInputs(bundle_uri, metrics, evaluate_run_id, lineage)                 (pipelines.stage)
        the DAG: stage 2's bundle when stage 2 ran, else stage 1's; the metrics evaluate measured
        for that model; `geco register BUNDLE [--metrics FILE]` from the command line
    a `<name>/register` MLflow run (lineage tags, the metrics, the decision) and, through
    geco.registry, in the registry `registry.model_name`:
        a version (or the version this bundle already has: geco.json's bundle_id)
        alias `candidate` -> it; alias `production` -> it only when nothing regressed (geco.registry.decide)
    outputs: uris {"model": "models:/<name>/<version>"}, name, version, aliases, promoted, why

Where the version's files come from (geco.registry): a bundle already logged as run artifacts (the
DAG passes the training run as ``lineage["bundle_run_id"]``; its ``weights/bundle/geco.json`` must
carry the same bundle id) is registered from ``runs:/<run>/weights/bundle`` without a copy; otherwise
the bundle is checked, copied into a LoggedModel's artifacts and registered from ``models:/<model_id>``.

Idempotent: the same bundle with the same metrics and aliases in place opens no run and says
"nothing to do"; new metrics for an already registered bundle update its version's tags.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from geco.config import GecoConfig
from geco.models.bundle import read_manifest, resolve_checkpoint
from geco.registry import (
    BUNDLE_ID_TAG,
    Decision,
    RegistryError,
    aliases_of,
    clean_metrics,
    create_version,
    decide,
    find_version,
    metric_tags,
    metrics_from_tags,
    version_by_alias,
)
from geco.tracking import lineage_tags, redact_uri, start_run
from pipelines.stage import RegisterInputs, StageOutputs

log = logging.getLogger(__name__)

STAGE = "register"
LOGGED_BUNDLE = "weights/bundle"  # where the training stages log their bundle (pipelines.training.worker)
LOGGED_MODEL_TAG = "geco.logged_model_id"


@dataclass
class RegisterOutputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "model") plus the registry's answer."""

    stage: str = STAGE
    name: str = ""
    version: str = ""
    aliases: list[str] = field(default_factory=list)
    promoted: bool = False  # the production alias points at this version now (moved here, or already)
    why: str = ""  # why production moved or stayed
    source: str = ""  # where MLflow downloads the version from
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return self.uris.get("model")

    def note(self) -> str:
        return (f"{self.model_uri} [{', '.join(self.aliases) or 'no alias'}]; "
                f"production {'-> this version' if self.promoted else 'stays'}: {self.why}")

    def summary(self) -> str:
        head = "nothing to do; " if not self.did_work else ""
        lines = [f"register: {head}{self.model_uri} (aliases: {', '.join(self.aliases) or 'none'}) "
                 f"in {self.seconds:.1f} s",
                 f"  production: {'this version' if self.promoted else 'unchanged'} ({self.why})",
                 f"  source: {self.source}",
                 f"  metrics: {len(self.metrics)} GSO metric(s)"]
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        alias = "production" if self.promoted else (self.aliases[0] if self.aliases else "")
        if alias:
            lines.append(f"next:   geco generate IMAGE --checkpoint models:/{self.name}@{alias} -o outputs/generated")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------
@dataclass
class _Bundle:
    root: Path  # a local, checked copy
    bundle_id: str
    source: str | None  # an immutable MLflow location to register from, or None (copy it)


def _logged_bundle_id(client, run_id: str) -> str | None:
    """The bundle id in ``runs:/<run_id>/weights/bundle/geco.json``, or None when there is none."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="geco-register-") as tmp:
        try:
            path = client.download_artifacts(run_id, f"{LOGGED_BUNDLE}/geco.json", tmp)
            return json.loads(Path(path).read_text()).get("bundle_id")
        except (MlflowException, OSError, ValueError) as e:
            log.debug("run %s has no logged bundle: %s", run_id, e)
            return None


def locate_bundle(client, bundle_uri: str, *, bundle_run_id: str | None, tracking_uri: str) -> _Bundle:
    """Check the bundle (:func:`~geco.models.bundle.resolve_checkpoint`: CheckpointError naming what is
    missing) and find where to register it from (module docstring)."""
    root = resolve_checkpoint(bundle_uri, tracking_uri=tracking_uri)
    bundle_id = read_manifest(root).get("bundle_id") or ""
    if bundle_uri.startswith("runs:/"):
        return _Bundle(root, bundle_id, bundle_uri.rstrip("/"))
    if bundle_run_id and bundle_id and _logged_bundle_id(client, bundle_run_id) == bundle_id:
        return _Bundle(root, bundle_id, f"runs:/{bundle_run_id}/{LOGGED_BUNDLE}")
    return _Bundle(root, bundle_id, None)


def _source_run(runs_uri: str) -> str:
    """``runs:/<run_id>/<path>`` -> ``<run_id>``."""
    return runs_uri[len("runs:/"):].split("/", 1)[0]


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _outputs(name: str, version, client, decision: Decision, source: str, metrics: dict, **kw) -> RegisterOutputs:
    aliases = aliases_of(client, name, version)
    return RegisterOutputs(uris={"model": f"models:/{name}/{version}"}, name=name, version=str(version),
                           aliases=aliases, promoted=decision.promote, why=decision.why, source=source,
                           metrics=metrics, **kw)


def run(cfg: GecoConfig, inputs: RegisterInputs, *, parent_run_id: str | None = None) -> RegisterOutputs:
    """Register ``inputs.bundle_uri`` as a version of ``registry.model_name`` (module docstring)."""
    from mlflow import MlflowClient  # lazy: MLflow takes seconds to import

    t0 = time.perf_counter()
    reg = cfg.registry
    if not cfg.tracking.enabled:
        raise RegistryError("register: tracking.enabled is false, but the model registry lives in MLflow; "
                            "set tracking.enabled=true (and tracking.uri) or leave register out of --stages")
    name = reg.model_name
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    bundle = locate_bundle(client, inputs.bundle_uri, bundle_run_id=inputs.lineage.get("bundle_run_id"),
                           tracking_uri=cfg.tracking.uri)
    metrics = clean_metrics(inputs.metrics)

    # what is there already
    existing = find_version(client, name, bundle.bundle_id)
    production = version_by_alias(client, name, reg.production_alias)
    candidate = version_by_alias(client, name, reg.candidate_alias)
    old_metrics = metrics_from_tags(existing.tags) if existing is not None else {}
    metrics = metrics or old_metrics  # registered again without an evaluation: keep what it had
    if existing is not None and production is not None and str(production.version) == str(existing.version):
        decision = Decision(True, f"version {existing.version} is {reg.production_alias} already")
    else:
        decision = decide(metrics, metrics_from_tags(production.tags) if production is not None else None, reg,
                          str(production.version) if production is not None else None)
    if (existing is not None and metrics == old_metrics and candidate is not None
            and str(candidate.version) == str(existing.version)
            and (not decision.promote or (production is not None and str(production.version) == str(existing.version)))):
        log.info("register: bundle %s is version %s already, nothing changed", bundle.bundle_id, existing.version)
        if production is not None and str(production.version) == str(existing.version):
            decision = Decision(True, f"version {existing.version} is {reg.production_alias} already")
        return _outputs(name, existing.version, client, decision, existing.source, metrics,
                        mlflow_run_ids={STAGE: existing.run_id} if existing.run_id else {},
                        did_work=False, seconds=time.perf_counter() - t0)

    lineage = {k: redact_uri(v) for k, v in inputs.lineage.items() if v}
    input_uris = {"bundle": inputs.bundle_uri}
    with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}", parent_run_id=parent_run_id,
                   tags={"geco.stage": STAGE, **lineage_tags(cfg, inputs=input_uris)}) as tracker:
        run_id = tracker.run_id
        tracker.log_params({"registry": reg.model_dump(mode="json"), "register.bundle_uri": redact_uri(inputs.bundle_uri),
                            "register.evaluate_run_id": inputs.evaluate_run_id or ""})
        tags = {BUNDLE_ID_TAG: bundle.bundle_id, "geco.bundle_uri": redact_uri(inputs.bundle_uri),
                "geco.register_run_id": run_id, **metric_tags(metrics),
                **({"geco.evaluate_run_id": inputs.evaluate_run_id} if inputs.evaluate_run_id else {}),
                **{f"geco.lineage.{k}": v for k, v in lineage.items()}}
        if existing is None:
            experiment_id = client.get_run(run_id).info.experiment_id
            model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                               tags={BUNDLE_ID_TAG: bundle.bundle_id})
            source = bundle.source
            if source is None:  # a folder or prefix a later run may overwrite: register a copy
                client.log_model_artifacts(model.model_id, str(bundle.root))
                source = f"models:/{model.model_id}"
            client.finalize_logged_model(model.model_id, "READY")
            tags[LOGGED_MODEL_TAG] = model.model_id
            # a server checks that run_id / model_id name what holds the source: the training run that
            # logged the bundle, or the LoggedModel holding the copy (then the version's run is this one)
            copied = bundle.source is None
            version = create_version(client, name, source, run_id=run_id if copied else _source_run(source),
                                     tags=tags, model_id=model.model_id if copied else None,
                                     description=f"GECO bundle {bundle.bundle_id} from {redact_uri(inputs.bundle_uri)}")
            number, model_id = version.version, model.model_id
        else:  # the same bundle again (e.g. evaluated anew): its version, updated
            number, source, model_id = existing.version, existing.source, existing.tags.get(LOGGED_MODEL_TAG)
            for k in set(old_metrics) - set(metrics):
                client.delete_model_version_tag(name, number, k)
            for k, v in {**tags, "geco.register_run_id": run_id}.items():
                client.set_model_version_tag(name, number, k, v)
        tracker.log_metrics(metrics, model_id=model_id)
        client.set_registered_model_alias(name, reg.candidate_alias, number)
        if decision.promote:
            client.set_registered_model_alias(name, reg.production_alias, number)
        out = _outputs(name, number, client, decision, source, metrics, mlflow_run_ids={STAGE: run_id} if run_id else {})
        tracker.set_tags({"geco.registry.model": name, "geco.registry.version": str(number),
                          "geco.model_uri": out.model_uri, "geco.registry.promoted": str(decision.promote).lower(),
                          "geco.registry.why": decision.why[:5000], "geco.registry.source": source})
        out.seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": out.seconds})
    log.info("register: %s", out.note())
    return out
