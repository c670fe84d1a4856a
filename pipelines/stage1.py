"""DAG stage `stage1`: VSD distillation of the frozen teacher into the one-step generator.

    inputs: Stage1Inputs(dataset_uri, teacher_uri, reconstructor_uri)                (pipelines.stage)
        the DAG: what pretrain trained, else models.<m>.pretrained;
        `geco train stage1`: --teacher / --reconstructor, else :func:`default_inputs`
    pipelines.training.run_training_stage: pre-flight, the "already complete" shortcut, train/val
    Ray Datasets, a `<name>/stage1` MLflow run (config as params, the inputs as lineage tags,
    per-step losses and both learning rates, held-out metrics and sample grids, the bundle as
    artifacts), a Ray Train job running
        geco.train.stage1.VSDTask  -> <stage1.output_uri>/generator/  (diffusers UNet + generator.json)
                                   -> <stage1.output_uri>/bundle/     (GECO checkpoint: `geco generate`)

Where the teacher and reconstructor come from, when nobody says (:func:`default_inputs`):
``models.<m>.pretrained`` when set, else what `geco train pretrain` wrote under
``pretrain.output_uri`` when it is there. Nothing found: for the reconstructor "" (a tiny random one,
with a warning); for the teacher a :class:`~pipelines.training.TrainSetupError` - distilling a random
teacher by accident is worthless, so the tiny random teacher must be asked for by name,
``--teacher tiny`` / ``models.teacher.pretrained: tiny`` (tests and demos only).
A given URI may be the weights themselves (a Zero123++ folder; a .safetensors file) or a pretrain
output folder holding them (teacher/, reconstructor/model.safetensors); one that holds neither
is a :class:`~pipelines.training.TrainSetupError` naming it.

Re-running resumes from the latest checkpoint (the Ray Train run name is derived from the config
name, the teacher and the model architecture); a run that already reached its steps says "nothing
to do" and opens no MLflow run. ``stage1.fsdp`` asks the glue for FSDP on the generator (GPU workers).
Feed the generator to later stages with :meth:`Stage1Outputs.overrides`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from geco import storage
from geco.config import GecoConfig
from geco.models.teacher import TINY as TINY_TEACHER
from geco.storage import absolute_uri
from geco.train.stage1 import VSDTask
from pipelines.stage import Stage1Inputs, StageOutputs
from pipelines.training import TrainJob, TrainResult, TrainSetupError, run_training_stage

STAGE = "stage1"


@dataclass
class Stage1Outputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "bundle", "generator") plus extras."""

    stage: str = STAGE
    output_uri: str = ""
    teacher_uri: str = ""  # the teacher that was distilled ("tiny" = the tiny random one)
    reconstructor_uri: str = ""  # the reconstructor in the bundle ("" = a tiny random one)
    metrics: dict[str, float] = field(default_factory=dict)  # the final held-out metrics (eval/ stripped)
    result: TrainResult | None = None
    val_source: str = ""  # "manifest" or "holdout"
    eval_keys: list[str] = field(default_factory=list)

    @property
    def bundle_uri(self) -> str | None:  # the GECO checkpoint (teacher encoders + generator + reconstructor)
        return self.uris.get("bundle")

    @property
    def generator_uri(self) -> str | None:  # the generator alone (save_generator layout)
        return self.uris.get("generator")

    def overrides(self) -> list[str]:
        """``--set`` overrides that point later stages at the generator trained here."""
        return [f"models.generator.pretrained={self.generator_uri}"] if self.generator_uri else []

    def note(self) -> str:
        r = self.result
        note = f"step {r.step}{r.how()}" if r is not None else "no result"
        return note + f"; teacher {self.teacher_uri or 'none'} -> bundle {self.bundle_uri}"

    def summary(self) -> str:
        head = "nothing to do; " if not self.did_work else ""
        lines = [f"stage1: {head}evaluated on {len(self.eval_keys)} {self.val_source} object(s) in {self.seconds:.1f} s",
                 f"  teacher: {self.teacher_uri or 'none'}"]
        if self.result is not None:
            lines.append("  " + self.result.summary().replace("\n", "\n  "))
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def teacher_folder(uri: str, what: str = "teacher") -> str:
    """``uri`` (a Zero123++ teacher folder, or a pretrain output holding ``teacher/``) -> the teacher
    folder, absolute when local; "" and "tiny" stay as they are. Else :class:`TrainSetupError` naming it."""
    if uri in ("", TINY_TEACHER):
        return uri
    uri = absolute_uri(uri.rstrip("/"))
    for cand in (uri, storage.join(uri, "teacher")):
        if storage.exists(storage.join(cand, "model_index.json")):
            return cand
    raise TrainSetupError(f"{what}={uri}: neither a Zero123++ teacher folder (model_index.json) nor a pretrain "
                          "output holding teacher/; run `geco train pretrain` first or give another --teacher")


def reconstructor_file(uri: str, what: str = "reconstructor") -> str:
    """``uri`` (a reconstructor .safetensors, or a folder holding ``[reconstructor/]model.safetensors``)
    -> the file, absolute when local; "" stays "". Else :class:`TrainSetupError` naming it."""
    if not uri:
        return ""
    uri = absolute_uri(uri.rstrip("/"))
    cands = [uri] if uri.endswith(".safetensors") else [storage.join(uri, "reconstructor", "model.safetensors"),
                                                        storage.join(uri, "model.safetensors")]
    for cand in cands:
        if storage.exists(cand):
            return cand
    raise TrainSetupError(f"{what}={uri}: no reconstructor weights at {' or '.join(cands)}; run `geco train "
                          "pretrain` first or give another --reconstructor")


def default_inputs(cfg: GecoConfig, *, dataset_uri: str | None = None, teacher: str | None = None,
                   reconstructor: str | None = None) -> Stage1Inputs:
    """The stage's inputs: each of ``teacher`` / ``reconstructor`` when given, else
    ``models.<m>.pretrained`` when set, else the pretrain stage's output under
    ``pretrain.output_uri`` when it is there, else "" for the reconstructor (tiny random) and a
    :class:`TrainSetupError` for the teacher (``"tiny"`` asks for the tiny random one). Checked and
    made absolute."""
    def pick(given: str | None, name: str, resolve) -> str:
        if given:
            return resolve(given, f"--{name}")
        configured = getattr(cfg.models, name).pretrained
        if configured:
            return resolve(configured, f"models.{name}.pretrained")
        try:
            return resolve(cfg.pretrain.output_uri, f"pretrain.output_uri ({name})")
        except TrainSetupError:
            if name == "teacher":
                raise TrainSetupError(
                    f"stage1: no teacher: models.teacher.pretrained is empty and {cfg.pretrain.output_uri} holds no "
                    "pretrained teacher; run `geco train pretrain` first, give --teacher URI, or --teacher "
                    f"{TINY_TEACHER} for a tiny random one (tests only)") from None
            return ""  # nothing pretrained: a tiny random reconstructor (VSDTask warns)

    return Stage1Inputs(dataset_uri=dataset_uri or cfg.dataset.uri,
                        teacher_uri=pick(teacher, "teacher", teacher_folder),
                        reconstructor_uri=pick(reconstructor, "reconstructor", reconstructor_file))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run(cfg: GecoConfig, inputs: Stage1Inputs | None = None, *, parent_run_id: str | None = None) -> Stage1Outputs:
    """Distil ``inputs.teacher_uri`` into the one-step generator (``inputs``: :func:`default_inputs`
    when None); returns where the weights went."""
    inputs = inputs or default_inputs(cfg)
    if not inputs.teacher_uri:
        raise TrainSetupError(f"stage1: no teacher input; give a teacher folder or pretrain output, or {TINY_TEACHER!r} "
                              "for a tiny random one (tests only)")
    s1 = cfg.stage1
    fsdp = s1.fsdp and s1.train.num_workers > 1
    job = TrainJob(STAGE, VSDTask, "stage1.train", log_weights=("bundle",) if s1.log_weights else False,
                   parallel_strategy="fsdp" if fsdp else "ddp",
                   parallel_strategy_kwargs={"use_orig_params": True} if fsdp else None)
    run = run_training_stage(
        cfg, STAGE, [job], dataset_uri=inputs.dataset_uri, output_uri=s1.output_uri, inputs=inputs.task_inputs(),
        parent_run_id=parent_run_id,
        tags={"geco.teacher_uri": inputs.teacher_uri,
              "geco.reconstructor_uri": inputs.reconstructor_uri or "tiny random",
              "geco.stage1.parallel": "fsdp" if fsdp else "ddp"})
    result = run.results[STAGE]
    return Stage1Outputs(
        uris={k: v for k, v in result.exported.items() if k in ("bundle", "generator")},
        mlflow_run_ids=run.mlflow_run_ids, did_work=run.did_work, seconds=run.seconds,
        output_uri=absolute_uri(s1.output_uri), teacher_uri=inputs.teacher_uri,
        reconstructor_uri=inputs.reconstructor_uri, result=result, val_source=run.info.val_source,
        eval_keys=run.info.eval_keys,
        metrics={k[5:]: float(v) for k, v in result.metrics.items()
                 if k.startswith("eval/") and isinstance(v, (int, float))})
