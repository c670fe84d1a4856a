"""The MLflow model registry for GECO bundles: versions, aliases, and the promotion rule.

A GECO checkpoint bundle (:mod:`geco.models.bundle`) becomes a version of registered model
``registry.model_name`` (default ``geco``). What a version holds:

* **source**: where MLflow downloads it from (``models:/geco@production`` resolves to it). A bundle
  already logged as run artifacts (stage 1 and 2 log theirs at ``runs:/<run>/weights/bundle``) is
  registered from there, without a copy. A bundle that lives only in a folder or S3 prefix (which a
  later run may overwrite) is first copied into the artifacts of an MLflow **LoggedModel**; the
  version's source is then ``models:/<model_id>``.
* **metrics**: the GSO metrics (``gso/<view set>/<metric>``) as version tags (the registry's own
  record: they are what the promotion rule reads, on a sqlite store or a server alike), logged on
  the `register` stage's run (tag ``geco.register_run_id``) and attached to a LoggedModel made for
  the version (``log_metrics(..., model_id=...)``: MLflow 3 shows them on the model's page; tag
  ``geco.logged_model_id``). The OSS registry does not store a version's ``model_id``, so the tags
  are the one place every store keeps.
* **run**: an MLflow server checks that a version's ``run_id`` / ``model_id`` name what holds its
  source: a version registered from ``runs:/`` belongs to that (training) run; a copied one to the
  register run and its LoggedModel.
* **tags**: ``geco.bundle_id`` (the bundle's id from its ``geco.json``: the same bundle registered
  again finds its version instead of making a new one), the bundle's original URI, lineage.

Aliases (MLflow's replacement for stages): ``candidate`` always points at the newest registration;
``production`` moves only when :func:`decide` allows it: no gated metric worse than production's by
more than ``registry.tolerance`` (relative), or no production version yet. Otherwise production
stays and the reason is returned (the stage prints it and tags its run with it).

Nothing here imports Ray; the MLflow client is passed in (:class:`geco.tracking.Tracker.client`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from geco.config import HIGHER_IS_BETTER, RegistryConfig

METRIC_PREFIX = "gso/"  # GSO metrics: gso/<view set>/<metric>
BUNDLE_ID_TAG = "geco.bundle_id"


class RegistryError(RuntimeError):
    """A registration a user can fix (bad metrics file, tracking off, unknown bundle): one line."""


# ---------------------------------------------------------------------------------------------
# the promotion rule (pure)
# ---------------------------------------------------------------------------------------------
def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Finite float values only (``None``, NaN and non-numbers - "unavailable" - are left out)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[str(k)] = float(v)
    return out


def higher_is_better(key: str) -> bool:
    """``gso/orbit/psnr`` -> True; ``gso/orbit/cd`` -> False (the metric's last path component)."""
    return key.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def gated(metrics: Mapping[str, float], gate: list[str]) -> dict[str, float]:
    """The metrics the rule compares: ``gso/...`` keys whose last component is in ``gate``."""
    return {k: v for k, v in metrics.items() if k.startswith(METRIC_PREFIX) and k.rsplit("/", 1)[-1] in gate}


def regressions(candidate: Mapping[str, float], production: Mapping[str, float], tolerance: float,
                gate: list[str]) -> tuple[list[str], list[str]]:
    """(regressed, compared): each gated metric in both, worse than production's by more than
    ``tolerance`` x |production's value|; ``regressed`` lines read ``gso/orbit/psnr 18.2 < 20.5 (-11.2%)``."""
    cand, prod = gated(candidate, gate), gated(production, gate)
    compared = sorted(set(cand) & set(prod))
    bad = []
    for k in compared:
        new, old = cand[k], prod[k]
        worse = (old - new) if higher_is_better(k) else (new - old)
        if worse > tolerance * abs(old):
            rel = f" ({(new - old) / abs(old):+.1%})" if old else ""
            bad.append(f"{k} {new:.4g} {'<' if higher_is_better(k) else '>'} {old:.4g}{rel}")
    return bad, compared


@dataclass
class Decision:
    """Whether the production alias moves to the candidate, and why (one line)."""

    promote: bool
    why: str
    compared: list[str] = field(default_factory=list)
    regressed: list[str] = field(default_factory=list)


def decide(candidate: Mapping[str, float], production: Mapping[str, float] | None, cfg: RegistryConfig,
           production_version: str | None = None) -> Decision:
    """The promotion rule (module docstring). ``production``: the current production version's
    metrics (None: there is no production version)."""
    alias = cfg.production_alias
    if cfg.promote == "never":
        return Decision(False, f"registry.promote is never: {alias} is not moved")
    if cfg.promote == "always":
        return Decision(True, f"registry.promote is always: {alias} moves without comparing metrics")
    if production is None:
        return Decision(True, f"no {alias} version yet")
    where = f"{alias} version {production_version}" if production_version else alias
    if not gated(candidate, cfg.gate_metrics):
        return Decision(False, f"the candidate has no GSO metrics ({', '.join(cfg.gate_metrics)}) to compare with "
                               f"{where} (run evaluate, or give --metrics); {alias} stays")
    if not gated(production, cfg.gate_metrics):
        return Decision(True, f"{where} has no GSO metrics to compare with")
    bad, compared = regressions(candidate, production, cfg.tolerance, cfg.gate_metrics)
    if not compared:
        return Decision(False, f"the candidate and {where} share no GSO metric to compare; {alias} stays")
    if bad:
        return Decision(False, f"regressed beyond registry.tolerance={cfg.tolerance:g} against {where}: "
                               + "; ".join(bad) + f"; {alias} stays", compared, bad)
    return Decision(True, f"no metric regressed beyond registry.tolerance={cfg.tolerance:g} against {where} "
                          f"({len(compared)} compared)", compared)


# ---------------------------------------------------------------------------------------------
# the registry (an MlflowClient)
# ---------------------------------------------------------------------------------------------
def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The GSO metrics a version carries as tags."""
    out = {}
    for k, v in tags.items():
        if k.startswith(METRIC_PREFIX):
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return clean_metrics(out)


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {k: repr(float(v)) for k, v in metrics.items()}


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="GECO checkpoint bundles (geco.json layout): "
                                                              "`geco generate --checkpoint models:/<name>@<alias>`")
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)


def version_by_alias(client, name: str, alias: str):
    """The ModelVersion ``alias`` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(client, name: str, bundle_id: str):
    """The newest version of ``name`` registered from the bundle ``bundle_id``, or None."""
    from mlflow.exceptions import MlflowException

    if not bundle_id:
        return None
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{BUNDLE_ID_TAG}` = '{bundle_id}'")
    except MlflowException:  # no such registered model
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def create_version(client, name: str, source: str, *, run_id: str | None, tags: Mapping[str, str],
                   model_id: str | None = None, description: str = ""):
    """A new version of ``name`` (created if needed) from ``source``."""
    ensure_registered_model(client, name)
    return client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags), model_id=model_id,
                                       description=description or None)


def aliases_of(client, name: str, version: str | int) -> list[str]:
    """The aliases pointing at ``version`` (sorted)."""
    model = client.get_registered_model(name)
    return sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version))
