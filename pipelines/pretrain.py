"""DAG stage `pretrain`: train a teacher and/or a reconstructor from the render shards.

    inputs: PretrainInputs(dataset_uri)                                              (pipelines.stage)
    targets = [t in cfg.pretrain.targets whose models.<t>.pretrained is empty]      [driver]
    pipelines.training.run_training_stage: pre-flight, the "already complete" shortcut, train/val
    Ray Datasets, a `<name>/pretrain` MLflow run with one child run per target, per target a Ray
    Train job running
        geco.train.pretrain.TeacherPretrainTask        -> <output_uri>/teacher/ (Zero123++ layout)
        geco.train.pretrain.ReconstructorPretrainTask  -> <output_uri>/reconstructor/model.safetensors

Re-running resumes each job from its latest checkpoint (the Ray Train run name is derived from
the config name and the model architecture); when every job already reached its steps the stage
says "nothing to do", opens no MLflow run and returns the previous outputs. The outputs' ``uris``
("teacher", "reconstructor") are what stage 1 takes as inputs (the DAG wires them); outside the
DAG, :meth:`PretrainOutputs.overrides` gives the equivalent ``--set models.*.pretrained=...``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from geco.config import GecoConfig
from geco.storage import absolute_uri
from geco.train.pretrain import TASKS
from pipelines.stage import PretrainInputs, StageOutputs
from pipelines.training import TrainJob, TrainResult, TrainSetupError, run_training_stage

STAGE = "pretrain"


@dataclass
class PretrainOutputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "teacher" / "reconstructor") plus extras."""

    stage: str = STAGE
    output_uri: str = ""
    results: dict[str, TrainResult] = field(default_factory=dict)  # per target
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it was not trained
    val_source: str = ""  # "manifest" or "holdout"
    eval_keys: list[str] = field(default_factory=list)

    @property
    def teacher_uri(self) -> str | None:  # a Zero123++ folder (None: not trained here)
        return self.uris.get("teacher")

    @property
    def reconstructor_uri(self) -> str | None:  # LGM-layout safetensors (None: not trained here)
        return self.uris.get("reconstructor")

    def overrides(self) -> list[str]:
        """``--set`` overrides that point later stages at the weights trained here."""
        return [f"models.{t}.pretrained={self.uris[t]}" for t in ("teacher", "reconstructor") if self.uris.get(t)]

    def note(self) -> str:
        parts = [f"{t} step {r.step}{r.how()}" for t, r in self.results.items()]
        parts += [f"{t} skipped ({why})" for t, why in self.skipped.items()]
        return "; ".join(parts) + (f" -> {self.output_uri}" if self.results else "")

    def summary(self) -> str:
        done = sum(not r.already_complete for r in self.results.values())
        head = "nothing to do, " if self.results and not self.did_work else ""
        lines = [f"pretrain: {head}{done} model(s) trained, {len(self.results) - done} already complete, in "
                 f"{self.seconds:.1f} s (evaluated on {len(self.eval_keys)} {self.val_source} object(s))"]
        for r in self.results.values():
            lines.append("  " + r.summary().replace("\n", "\n  "))
        for target, why in self.skipped.items():
            lines.append(f"  {target}: skipped ({why})")
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def plan(cfg: GecoConfig) -> tuple[list[str], dict[str, str]]:
    """(targets to train, {target: why skipped})."""
    todo, skipped = [], {}
    for target in ("teacher", "reconstructor"):
        if target not in cfg.pretrain.targets:
            skipped[target] = "not in pretrain.targets"
        elif getattr(cfg.models, target).pretrained:
            skipped[target] = f"models.{target}.pretrained is set"
        else:
            todo.append(target)
    return todo, skipped


def run(cfg: GecoConfig, inputs: PretrainInputs | None = None, *, parent_run_id: str | None = None,
        targets: list[str] | None = None) -> PretrainOutputs:
    """Train the configured targets (``targets`` narrows ``cfg.pretrain.targets``) on
    ``inputs.dataset_uri`` (default: ``dataset.uri``); returns where the weights went."""
    inputs = inputs or PretrainInputs(cfg.dataset.uri)
    if targets is not None:
        unknown = set(targets) - set(TASKS)
        if unknown:
            raise TrainSetupError(f"unknown pretrain target(s) {sorted(unknown)}; choose from {sorted(TASKS)}")
        cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"targets": list(targets)})})
    todo, skipped = plan(cfg)
    outputs = PretrainOutputs(output_uri=absolute_uri(cfg.pretrain.output_uri), skipped=skipped, did_work=False)
    if not todo:
        return outputs
    jobs = [TrainJob(t, TASKS[t], f"{STAGE}.{t}", log_weights=cfg.pretrain.log_weights) for t in todo]
    run = run_training_stage(cfg, STAGE, jobs, dataset_uri=inputs.dataset_uri, output_uri=outputs.output_uri,
                             parent_run_id=parent_run_id, concurrent=cfg.pretrain.concurrent, child_runs=True)
    outputs.results = run.results
    outputs.uris = {t: r.exported[t] for t, r in run.results.items() if r.exported.get(t)}
    outputs.mlflow_run_ids, outputs.did_work, outputs.seconds = run.mlflow_run_ids, run.did_work, run.seconds
    outputs.val_source, outputs.eval_keys = run.info.val_source, run.info.eval_keys
    return outputs
