"""The DAG: every stage in order, under one MLflow parent run.

    MLflow: a `<name>/dag` parent run (the config as params and as config.json)      [driver]
    render    pipelines.render.run(cfg, parent_run_id=...)    -> shards + manifest
    pretrain  pipelines.pretrain.run(cfg, parent_run_id=...)  -> teacher / reconstructor weights
              (only the models without pretrained weights; `PretrainOutputs.skipped` says why not)
    stage1    pipelines.stage1.run(cfg', parent_run_id=...)   -> generator + GECO bundle
              cfg' = cfg with stage1.teacher / stage1.reconstructor pointing at what pretrain trained
    (pseudo_gt -> stage2 -> evaluate: later stages, added to STAGES as more steps)
    parent run: seconds per stage (`seconds/<stage>`), a stage table (stages.json: output URIs,
    child run ids, whether the stage did any work), tags with the final bundle URI

Each stage is idempotent (render skips objects already rendered by content hash; training resumes
from its checkpoints and returns at once when it reached its steps), so the DAG is re-runnable: a
second run with the same config does no work, and a failed run resumes where it stopped. A stage
that fails marks the parent run FAILED and raises :class:`StageFailed` naming it; the outputs of
the stages before it stay where they are.

A step is a function ``(DagContext) -> StageRecord``; a later stage is one more entry in ``STEPS``
that reads what it needs from ``ctx.outputs`` (e.g. ``ctx.outputs["stage1"].generator_uri``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from geco.config import ConfigError, GecoConfig
from geco.tracking import start_run

log = logging.getLogger(__name__)

STAGES = ("render", "pretrain", "stage1")  # in DAG order


class StageFailed(RuntimeError):
    """A stage of the DAG raised; ``stage`` names it, ``__cause__`` is its exception."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage} failed: {type(cause).__name__}: {cause}")


@dataclass
class StageRecord:
    """What one step of the DAG did."""

    stage: str
    seconds: float = 0.0
    status: str = "done"  # done | failed
    did_work: bool = False  # False: everything was in place already (a re-run)
    note: str = ""  # one line for the summary
    uris: dict[str, str] = field(default_factory=dict)  # output URIs, by name
    run_ids: dict[str, str] = field(default_factory=dict)  # MLflow child runs, by name
    outputs: Any = None  # the stage's own outputs (RenderOutputs, PretrainOutputs, Stage1Outputs)
    error: str = ""

    def row(self) -> dict:
        return {"stage": self.stage, "status": self.status, "seconds": round(self.seconds, 2),
                "did_work": self.did_work, "note": self.note, "outputs": json.dumps(self.uris, sort_keys=True),
                "mlflow_runs": json.dumps(self.run_ids, sort_keys=True), "error": self.error}


@dataclass
class DagOutputs:
    name: str
    stages: dict[str, StageRecord] = field(default_factory=dict)  # in the order they ran
    mlflow_run_id: str | None = None
    bundle_uri: str | None = None  # the final GECO checkpoint (`geco generate --checkpoint`)
    seconds: float = 0.0

    @property
    def did_work(self) -> dict[str, bool]:
        return {s: r.did_work for s, r in self.stages.items()}

    def __getitem__(self, stage: str):
        """The stage's own outputs: ``dag["render"].rendered``."""
        return self.stages[stage].outputs

    def summary(self) -> str:
        width = max([len(s) for s in self.stages] or [5])
        lines = [f"dag {self.name}: {len(self.stages)} stage(s) in {self.seconds:.1f} s"
                 + (f" (mlflow run {self.mlflow_run_id})" if self.mlflow_run_id else "")]
        for s, r in self.stages.items():
            lines.append(f"  {s:<{width}} {r.seconds:8.1f} s  {r.note}")
        if self.bundle_uri:
            lines.append(f"bundle: {self.bundle_uri}")
            lines.append(f"next:   geco generate IMAGE --checkpoint {self.bundle_uri} -o outputs/generated")
        else:
            lines.append("bundle: none (stage1 did not run)")
        return "\n".join(lines)


@dataclass
class DagContext:
    cfg: GecoConfig
    parent_run_id: str | None
    stages: list[str]  # the stages this run executes
    outputs: dict[str, Any] = field(default_factory=dict)  # stage -> its outputs, as they finish


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------
def _resumed(r) -> str:
    """How a training job (a :class:`~pipelines.train_common.TrainResult`) got to its step."""
    if r.already_complete:
        return " (already complete)"
    return f" (resumed from step {r.resumed_from})" if r.resumed_from else ""


def _render(ctx: DagContext) -> StageRecord:
    from pipelines import render

    out = render.run(ctx.cfg, parent_run_id=ctx.parent_run_id)
    uris = {"dataset": out.dataset_uri}
    if out.manifest_uri:
        uris["manifest"] = out.manifest_uri
    if out.failures_uri:
        uris["failures"] = out.failures_uri
    note = (f"{out.rendered} rendered, {out.skipped} skipped (done before), {out.failed} failed; "
            f"{len(out.new_shards)} new shard(s) -> {out.dataset_uri}")
    return StageRecord("render", did_work=bool(out.rendered or out.failed or out.new_shards), note=note, uris=uris,
                       run_ids={"render": out.mlflow_run_id} if out.mlflow_run_id else {}, outputs=out)


def _pretrain(ctx: DagContext) -> StageRecord:
    from pipelines import pretrain

    out = pretrain.run(ctx.cfg, parent_run_id=ctx.parent_run_id)
    uris = {k: v for k, v in (("teacher", out.teacher_uri), ("reconstructor", out.reconstructor_uri)) if v}
    run_ids = {"pretrain": out.mlflow_run_id} if out.mlflow_run_id else {}
    run_ids.update({f"pretrain/{t}": r.mlflow_run_id for t, r in out.results.items() if r.mlflow_run_id})
    parts = [f"{t} step {r.step}{_resumed(r)}" for t, r in out.results.items()]
    parts += [f"{t} skipped ({why})" for t, why in out.skipped.items()]
    note = "; ".join(parts) + (f" -> {out.output_uri}" if out.results else "")
    did_work = any(not r.already_complete for r in out.results.values())
    return StageRecord("pretrain", did_work=did_work, note=note, uris=uris, run_ids=run_ids, outputs=out)


def stage1_config(cfg: GecoConfig, pre=None) -> GecoConfig:
    """``cfg`` with ``stage1.teacher`` / ``stage1.reconstructor`` set from the pretrain stage.

    * a model pretrain trained (``pre``: its :class:`PretrainOutputs`) replaces ``""`` (which would be a
      tiny random model) and ``"pretrain"`` with the exported weights' URI;
    * ``"pretrain"`` for a model that has pretrained weights (``models.<m>.pretrained``; pretrain skips
      it) means those weights (``""``);
    * anything else (an explicit URI) is the user's choice and stays."""
    update = {}
    for target in ("teacher", "reconstructor"):
        current = getattr(cfg.stage1, target)
        trained = getattr(pre, f"{target}_uri", None) if pre is not None else None
        if trained and current in ("", "pretrain"):
            update[target] = trained
        elif current == "pretrain" and getattr(cfg.models, target).pretrained:
            update[target] = ""
    if not update:
        return cfg
    return cfg.model_copy(update={"stage1": cfg.stage1.model_copy(update=update)})


def _stage1(ctx: DagContext) -> StageRecord:
    from pipelines import stage1

    cfg = stage1_config(ctx.cfg, ctx.outputs.get("pretrain"))
    out = stage1.run(cfg, parent_run_id=ctx.parent_run_id)
    uris = {k: v for k, v in (("bundle", out.bundle_uri), ("generator", out.generator_uri)) if v}
    r = out.result
    did_work = r is None or not r.already_complete
    note = f"step {r.step}{_resumed(r)}" if r is not None else "no result"
    note += f"; teacher {out.teacher_uri or 'tiny random'} -> bundle {out.bundle_uri}"
    return StageRecord("stage1", did_work=did_work, note=note, uris=uris,
                       run_ids={"stage1": out.mlflow_run_id} if out.mlflow_run_id else {}, outputs=out)


STEPS: dict[str, Callable[[DagContext], StageRecord]] = {"render": _render, "pretrain": _pretrain, "stage1": _stage1}
assert tuple(STEPS) == STAGES


def parse_stages(stages: list[str] | str | None) -> list[str]:
    """``"render,pretrain"`` / ``["render", "pretrain"]`` / None (all) -> the stages in DAG order.
    Raises :class:`ConfigError` listing the valid names for an unknown or empty one."""
    if stages is None:
        return list(STAGES)
    names = stages.split(",") if isinstance(stages, str) else [n for s in stages for n in str(s).split(",")]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        what = f"unknown stage(s) {', '.join(unknown)}" if unknown else "no stages given"
        raise ConfigError(f"--stages: {what}; valid stages, in order: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def _check_cluster(cfg: GecoConfig, todo: list[str]) -> None:
    """Before any stage runs: the cluster can run every training job the DAG will start (otherwise
    a cluster without GPUs would render first and fail only at pretrain)."""
    from pipelines import pretrain
    from pipelines.train_common import check_cluster

    if "pretrain" in todo:
        targets, _ = pretrain.plan(cfg)
        check_cluster(cfg, [f"pretrain.{t}" for t in targets], concurrent=cfg.pretrain.concurrent)
    if "stage1" in todo:
        check_cluster(cfg, ["stage1.train"])


def run(cfg: GecoConfig, *, stages: list[str] | str | None = None,
        progress: Callable[[str], None] | None = None) -> DagOutputs:
    """Run ``stages`` (default: all, in DAG order) under one MLflow parent run ``<cfg.name>/dag``.

    ``progress``, when given, receives each stage's own summary as it finishes (the CLI prints it).
    Raises :class:`ConfigError` for an unknown stage name and :class:`TrainSetupError` when the Ray
    cluster cannot run a training job the DAG would start (both before any work), and
    :class:`StageFailed` when a stage fails (the parent run is then marked FAILED)."""
    todo = parse_stages(stages)
    _check_cluster(cfg, todo)
    t0 = time.perf_counter()
    outputs = DagOutputs(name=cfg.name)
    with start_run(cfg.tracking, run_name=f"{cfg.name}/dag", tags={"geco.stage": "dag"}) as tracker:
        outputs.mlflow_run_id = tracker.run_id
        tracker.log_params({**cfg.model_dump(mode="json"), "dag.stages": ",".join(todo)})
        tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
        tracker.set_tags({"geco.dag.stages": ",".join(todo)})
        ctx = DagContext(cfg=cfg, parent_run_id=tracker.run_id, stages=todo)

        def log_table() -> None:
            tracker.log_table([r.row() for r in outputs.stages.values()], "stages.json")

        for stage in todo:
            log.info("dag %s: stage %s", cfg.name, stage)
            t = time.perf_counter()
            try:
                record = STEPS[stage](ctx)
            except Exception as e:
                record = StageRecord(stage, seconds=time.perf_counter() - t, status="failed",
                                     note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                     error=f"{type(e).__name__}: {e}"[:2000])
                outputs.stages[stage] = record
                outputs.seconds = time.perf_counter() - t0
                try:  # best effort: never hide the stage's own error behind a tracking one
                    tracker.log_metrics({f"seconds/{stage}": record.seconds, "seconds": outputs.seconds})
                    tracker.set_tags({"geco.dag.failed_stage": stage})
                    log_table()
                except Exception as te:  # pragma: no cover - tracking server trouble
                    log.warning("dag: could not log the failure of %s to MLflow: %s", stage, te)
                raise StageFailed(stage, e) from e
            record.seconds = time.perf_counter() - t
            outputs.stages[stage] = record
            ctx.outputs[stage] = record.outputs
            tracker.log_metrics({f"seconds/{stage}": record.seconds, f"did_work/{stage}": float(record.did_work)})
            tracker.set_tags({f"geco.{stage}.{k}_uri": v for k, v in record.uris.items()})
            if progress is not None and record.outputs is not None:
                progress(record.outputs.summary())
        s1 = ctx.outputs.get("stage1")
        outputs.bundle_uri = getattr(s1, "bundle_uri", None)
        outputs.seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": outputs.seconds})
        log_table()
        tracker.set_tags({"geco.bundle_uri": outputs.bundle_uri or ""})
    return outputs
