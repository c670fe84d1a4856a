"""The DAG: every stage in order, under one MLflow parent run.

    MLflow: a `<name>/dag` parent run (the config as params and as config.json)       [driver]
    render    () -> RenderOutputs: shards + manifest                       (pipelines.render)
       │ uris["dataset"]
       ▼
    pretrain  PretrainInputs(dataset_uri) -> uris teacher / reconstructor  (pipelines.pretrain)
       │      (only the models without pretrained weights; `PretrainOutputs.skipped` says why not)
       │ uris["teacher"], uris["reconstructor"]  (else models.*.pretrained)
       ▼
    stage1    Stage1Inputs(dataset_uri, teacher_uri, reconstructor_uri) -> uris bundle / generator
       │ uris["bundle"]; the teacher / reconstructor stage 1 used
       ▼
    pseudo_gt PseudoGTInputs(dataset_uri, teacher_uri, reconstructor_uri) -> uris pseudo_gt (pipelines.pseudo_gt)
       │ uris["bundle"] (stage1), uris["pseudo_gt"] (else pseudo_gt.output_uri)
       ▼
    stage2    Stage2Inputs(pseudo_gt_uri, bundle_uri) -> uris bundle / generator  (pipelines.stage2)
       │ uris["bundle"] (stage1, stage2), the distilled teacher, the shards
       ▼
    evaluate  EvaluateInputs(models {stage1, stage2, teacher, teacher_1step}, dataset_uri)
              -> uris results / report, metrics per model, leakage     (pipelines.evaluate)
       │ the final bundle (stage2's, else stage1's) + evaluate's metrics for that model
       ▼
    register  RegisterInputs(bundle_uri, metrics, evaluate_run_id, lineage) -> uris model
              (models:/<registry.model_name>/<version>; alias candidate, production when nothing
              regressed)                                                   (pipelines.register)
    parent run: seconds per stage (`seconds/<stage>`), a stage table (stages.json: output URIs,
    child run ids, whether the stage did any work), tags with the final bundle URI

A step is ``Step(name, inputs, run)``: ``inputs(ctx)`` builds the stage's typed inputs
(:mod:`pipelines.stage`) from the outputs of the stages before it (``ctx.outputs``) and the
config; ``run(cfg, inputs, parent_run_id)`` returns its :class:`~pipelines.stage.StageOutputs`.
Results are handed over as inputs, never by rewriting the config.

Each stage is idempotent (render skips objects already rendered by content hash; a training stage
resumes from its checkpoints and, when complete, says "nothing to do" without a new MLflow run), so
the DAG is re-runnable: a second run with the same config does no work, and a failed run resumes
where it stopped. A stage that fails marks the parent run FAILED and raises :class:`StageFailed`
naming it; the outputs of the stages before it stay where they are.
"""
from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from geco.config import ConfigError, GecoConfig
from geco.tracking import lineage_tags, manifest_lineage, start_run
from pipelines.stage import (
    EvaluateInputs,
    PretrainInputs,
    PseudoGTInputs,
    RegisterInputs,
    Stage1Inputs,
    Stage2Inputs,
    StageOutputs,
)

log = logging.getLogger(__name__)

STAGES = ("render", "pretrain", "stage1", "pseudo_gt", "stage2", "evaluate", "register")  # in DAG order


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
    outputs: Any = None  # the stage's own outputs (a StageOutputs; render: RenderOutputs)
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
    model_uri: str | None = None  # its registered version, models:/<name>/<version> (register ran)
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
        ev = self.stages.get("evaluate")
        if ev is not None and ev.uris:
            lines.append(f"evaluation: {ev.uris.get('report') or ev.uris.get('results')}")
        if self.bundle_uri:
            lines.append(f"bundle: {self.bundle_uri}")
            lines.append(f"next:   geco generate IMAGE --checkpoint {self.bundle_uri} -o outputs/generated")
        else:
            lines.append("bundle: none (stage1 did not run)")
        reg = self.stages.get("register")
        if self.model_uri and reg is not None and reg.outputs is not None:
            lines.append(f"model:  {self.model_uri} (aliases: {', '.join(reg.outputs.aliases) or 'none'})")
        return "\n".join(lines)


@dataclass
class DagContext:
    cfg: GecoConfig
    parent_run_id: str | None
    stages: list[str]  # the stages this run executes
    outputs: dict[str, Any] = field(default_factory=dict)  # stage -> its outputs (StageOutputs), as they finish


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One stage of the DAG: its name, how its inputs are built, how it runs."""

    name: str
    inputs: Callable[[DagContext], Any]
    run: Callable[[GecoConfig, Any, str | None], Any]


def _stage(name: str):
    """The stage's module, imported when the DAG runs it (lazy: stages import torch, diffusers and
    Ray; the CLI imports this module for STAGES at start-up)."""
    return importlib.import_module(f"pipelines.{name}")


def _dataset_uri(ctx: DagContext) -> str:
    """The shards: what render wrote in this run, else ``dataset.uri``."""
    return getattr(ctx.outputs.get("render"), "dataset_uri", None) or ctx.cfg.dataset.uri


def pretrain_inputs(ctx: DagContext) -> PretrainInputs:
    return PretrainInputs(_dataset_uri(ctx))


def stage1_inputs(ctx: DagContext) -> Stage1Inputs:
    """What pretrain trained in this run; otherwise :func:`pipelines.stage1.default_inputs`
    (``models.<m>.pretrained``, else an earlier pretrain output, else tiny random)."""
    trained = getattr(ctx.outputs.get("pretrain"), "uris", {})
    return _stage("stage1").default_inputs(ctx.cfg, dataset_uri=_dataset_uri(ctx), teacher=trained.get("teacher"),
                                           reconstructor=trained.get("reconstructor"))


def pseudo_gt_inputs(ctx: DagContext) -> PseudoGTInputs:
    """The render shards, and the teacher / reconstructor stage 1 distils and bundles (the same
    resolution: :func:`stage1_inputs`)."""
    s1 = stage1_inputs(ctx)
    return PseudoGTInputs(s1.dataset_uri, s1.teacher_uri, s1.reconstructor_uri)


def evaluate_inputs(ctx: DagContext) -> EvaluateInputs:
    """The bundles stage1 (and stage2) made in this run, and the teacher stage 1 distilled (as
    "teacher" and "teacher_1step"); otherwise :func:`pipelines.evaluate.dag_models` finds earlier
    outputs. ``evaluate.models`` entries take precedence; leakage is checked against this run's shards."""
    models = _stage("evaluate").dag_models(ctx.cfg, ctx.outputs.get("stage1"), ctx.outputs.get("stage2"))
    return _stage("evaluate").default_inputs(ctx.cfg, models, _dataset_uri(ctx))


def register_inputs(ctx: DagContext) -> RegisterInputs:
    """The final bundle (stage2's when it ran in this DAG run, else stage1's; else the last one on disk)
    with evaluate's metrics for that model (none when evaluate did not run) and the lineage to record."""
    final = next((s for s in ("stage2", "stage1") if getattr(ctx.outputs.get(s), "bundle_uri", None)), None)
    if final is not None:
        out = ctx.outputs[final]
        bundle_uri, bundle_run = out.bundle_uri, out.mlflow_run_id or ""
    else:  # `--stages register`: the newest bundle the training stages left at their output_uri
        from geco import storage  # light; only this branch needs it

        final, bundle_uri, bundle_run = "", "", ""
        for s in ("stage2", "stage1"):
            section = getattr(ctx.cfg, s, None)
            uri = storage.join(storage.absolute_uri(section.output_uri), "bundle") if section is not None else ""
            if uri and storage.exists(storage.join(uri, "geco.json")):
                final, bundle_uri = s, uri
                break
        if not bundle_uri:
            raise ConfigError("register: no bundle to register: run stage1 (or stage2) first, or register one with "
                              "`geco register BUNDLE_URI`")
    evaluate = ctx.outputs.get("evaluate")
    metrics = {k: v for k, v in ((getattr(evaluate, "metrics", None) or {}).get(final) or {}).items()
               if v is not None}  # None: a metric evaluate could not compute (e.g. LPIPS without weights)
    dataset = _dataset_uri(ctx)
    lineage = {"bundle_stage": final, "bundle_run_id": bundle_run, "dag_run_id": ctx.parent_run_id or "",
               "dataset_uri": dataset,
               # the dataset version trained on: `geco retrain` starts from what came after it
               "dataset_manifest_uri": manifest_lineage(dataset)[0]}
    lineage.update({f"{s}_run_id": out.mlflow_run_id for s, out in ctx.outputs.items()
                    if getattr(out, "mlflow_run_id", None)})
    return RegisterInputs(bundle_uri=bundle_uri, metrics=metrics,
                          evaluate_run_id=getattr(evaluate, "mlflow_run_id", None), lineage=lineage)


def stage2_inputs(ctx: DagContext) -> Stage2Inputs:
    """What pseudo_gt and stage1 wrote in this run; otherwise :func:`pipelines.stage2.default_inputs`
    (``pseudo_gt.output_uri``, ``<stage1.output_uri>/bundle``)."""
    pgt = getattr(ctx.outputs.get("pseudo_gt"), "uris", {}).get("pseudo_gt")
    bundle = getattr(ctx.outputs.get("stage1"), "bundle_uri", None)
    return _stage("stage2").default_inputs(ctx.cfg, pseudo_gt=pgt, bundle=bundle)


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("render", lambda ctx: None, lambda cfg, _, parent: _stage("render").run(cfg, parent_run_id=parent)),
    Step("pretrain", pretrain_inputs, lambda cfg, inputs, parent: _stage("pretrain").run(cfg, inputs,
                                                                                        parent_run_id=parent)),
    Step("stage1", stage1_inputs, lambda cfg, inputs, parent: _stage("stage1").run(cfg, inputs, parent_run_id=parent)),
    Step("pseudo_gt", pseudo_gt_inputs,
         lambda cfg, inputs, parent: _stage("pseudo_gt").run(cfg, inputs, parent_run_id=parent)),
    Step("stage2", stage2_inputs, lambda cfg, inputs, parent: _stage("stage2").run(cfg, inputs, parent_run_id=parent)),
    Step("evaluate", evaluate_inputs, lambda cfg, inputs, parent: _stage("evaluate").run(cfg, inputs,
                                                                                        parent_run_id=parent)),
    Step("register", register_inputs, lambda cfg, inputs, parent: _stage("register").run(cfg, inputs,
                                                                                        parent_run_id=parent)),
)}
assert tuple(STEPS) == STAGES


def _record(stage: str, out: Any) -> StageRecord:
    """The DAG's row for a stage's outputs."""
    if not isinstance(out, StageOutputs):  # render's RenderOutputs (until it returns StageOutputs)
        uris = {k: v for k, v in (("dataset", out.dataset_uri), ("manifest", out.manifest_uri),
                                  ("failures", out.failures_uri)) if v}
        note = (f"{out.rendered} rendered, {out.skipped} skipped (done before), {out.failed} failed; "
                f"{len(out.new_shards)} new shard(s) -> {out.dataset_uri}")
        return StageRecord(stage, did_work=bool(out.rendered or out.failed or out.new_shards), note=note, uris=uris,
                           run_ids={stage: out.mlflow_run_id} if out.mlflow_run_id else {}, outputs=out)
    return StageRecord(stage, did_work=out.did_work, note=out.note(), uris=dict(out.uris),
                       run_ids=dict(out.mlflow_run_ids), outputs=out)


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
    from pipelines.training import check_cluster  # lazy, as _stage

    if "pretrain" in todo:
        targets, _ = _stage("pretrain").plan(cfg)
        check_cluster(cfg, [f"pretrain.{t}" for t in targets], concurrent=cfg.pretrain.concurrent)
    if "stage1" in todo:
        check_cluster(cfg, ["stage1.train"])
    if "stage2" in todo:
        check_cluster(cfg, ["stage2.train"])


def run(cfg: GecoConfig, *, stages: list[str] | str | None = None,
        progress: Callable[[str], None] | None = None, before_stage: Callable[[str], None] | None = None,
        run_name: str | None = None, tags: dict[str, str] | None = None) -> DagOutputs:
    """Run ``stages`` (default: all, in DAG order) under one MLflow parent run ``<cfg.name>/dag``
    (``run_name`` instead, with ``tags`` added: a retraining is a DAG run of its own name).

    ``progress``, when given, receives each stage's own summary as it finishes (the CLI prints it);
    ``before_stage``, each stage's name before it starts (a retraining checks its lease there: what it
    raises fails the run before the stage writes anything).
    Raises :class:`ConfigError` for an unknown stage name and :class:`TrainSetupError` when the Ray
    cluster cannot run a training job the DAG would start (both before any work), and
    :class:`StageFailed` when a stage fails (the parent run is then marked FAILED)."""
    todo = parse_stages(stages)
    if "register" in todo and not cfg.tracking.enabled:  # before any work: the registry lives in MLflow
        raise ConfigError("stage register needs MLflow, but tracking.enabled is false; set tracking.enabled=true "
                          "or leave register out (--stages " + ",".join(s for s in todo if s != "register") + ")")
    _check_cluster(cfg, todo)
    t0 = time.perf_counter()
    outputs = DagOutputs(name=cfg.name)
    configured = {f"models.{m}": getattr(cfg.models, m).pretrained for m in ("teacher", "generator", "reconstructor")}
    with start_run(cfg.tracking, run_name=run_name or f"{cfg.name}/dag", tags={
            "geco.stage": "dag", **lineage_tags(cfg, dataset_uri=cfg.dataset.uri, inputs=configured),
            **(tags or {})}) as tracker:
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
                if before_stage is not None:
                    before_stage(stage)
                step = STEPS[stage]
                record = _record(stage, step.run(cfg, step.inputs(ctx), ctx.parent_run_id))
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
        outputs.model_uri = getattr(ctx.outputs.get("register"), "model_uri", None)
        s2 = ctx.outputs.get("stage2")  # the fine-tuned bundle when stage 2 ran, else stage 1's
        outputs.bundle_uri = getattr(s2, "bundle_uri", None) or outputs.bundle_uri
        outputs.seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": outputs.seconds})
        log_table()
        tracker.set_tags({"geco.bundle_uri": outputs.bundle_uri or ""})
    return outputs
