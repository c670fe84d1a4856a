"""DAG stage `stage2`: 3D-consistency fine-tuning of the stage-1 generator against pseudo-GT.

    inputs: Stage2Inputs(pseudo_gt_uri, bundle_uri)                                   (pipelines.stage)
        the DAG: what pseudo_gt and stage1 wrote in this run, else :func:`default_inputs`;
        `geco train stage2`: --pseudo-gt / --bundle, else :func:`default_inputs`
    pipelines.training.run_training_stage: pre-flight, the "already complete" shortcut, train/val
    Ray Datasets of the pseudo-GT shards, a `<name>/stage2` MLflow run (config as params, the inputs
    as lineage tags, per-step losses and the learning rate, held-out PSNR/SSIM and sample grids
    generator views | reconstruction renders | pseudo-GT, the bundle as artifacts), a Ray Train job
    running
        geco.train.stage2.Stage2Task -> <stage2.output_uri>/generator/  (diffusers UNet + generator.json)
                                     -> <stage2.output_uri>/bundle/     (GECO checkpoint: `geco generate`)

Where the inputs come from, when nobody says (:func:`default_inputs`): the pseudo-GT shards at
``pseudo_gt.output_uri`` (``--pseudo-gt`` may name render shards too: they have the same schema)
and stage 1's bundle at ``<stage1.output_uri>/bundle``. A bundle
URI that does not resolve to a whole GECO checkpoint is a :class:`~pipelines.training.TrainSetupError`
naming it, before anything starts.

Re-running resumes from the latest checkpoint (the Ray Train run name is derived from the config
name and the input bundle's identity, so a re-trained stage-1 bundle starts a new run); a run that
already reached its steps says "nothing to do" and opens no MLflow run. Samples that cannot be used
(a view image missing, images without cameras, too few views) stop the job with one line naming the
shard and the object (after Ray Train's ``max_failures`` restarts, each resuming from the last
checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from geco import storage
from geco.config import GecoConfig
from geco.storage import absolute_uri
from geco.train.stage2 import Stage2Task
from pipelines.stage import Stage2Inputs, StageOutputs
from pipelines.training import TrainJob, TrainResult, TrainSetupError, run_training_stage

STAGE = "stage2"


@dataclass
class Stage2Outputs(StageOutputs):
    """:class:`~pipelines.stage.StageOutputs` (``uris``: "bundle", "generator") plus extras."""

    stage: str = STAGE
    output_uri: str = ""
    pseudo_gt_uri: str = ""  # the shards it was supervised with
    source_bundle_uri: str = ""  # stage 1's bundle it fine-tuned
    metrics: dict[str, float] = field(default_factory=dict)  # the final held-out metrics (eval/ stripped)
    result: TrainResult | None = None
    val_source: str = ""  # "manifest" or "holdout"
    eval_keys: list[str] = field(default_factory=list)

    @property
    def bundle_uri(self) -> str | None:  # the GECO checkpoint (`geco generate --checkpoint`)
        return self.uris.get("bundle")

    @property
    def generator_uri(self) -> str | None:  # the generator alone (save_generator layout)
        return self.uris.get("generator")

    def note(self) -> str:
        r = self.result
        note = f"step {r.step}{r.how()}" if r is not None else "no result"
        psnr = f"; held-out PSNR {self.metrics['psnr']:.2f} dB" if "psnr" in self.metrics else ""
        return note + psnr + f"; {self.source_bundle_uri} -> bundle {self.bundle_uri}"

    def summary(self) -> str:
        head = "nothing to do; " if not self.did_work else ""
        lines = [f"stage2: {head}evaluated on {len(self.eval_keys)} {self.val_source} object(s) in {self.seconds:.1f} s",
                 f"  pseudo-GT: {self.pseudo_gt_uri}", f"  from bundle: {self.source_bundle_uri}"]
        if self.result is not None:
            lines.append("  " + self.result.summary().replace("\n", "\n  "))
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def checked_bundle(uri: str, what: str = "bundle") -> str:
    """``uri`` (a GECO checkpoint: local folder, s3:// prefix or MLflow URI), absolute when local,
    once it resolves to a whole checkpoint; else :class:`TrainSetupError` naming it."""
    from geco.models.bundle import CheckpointError, resolve_checkpoint

    uri = absolute_uri(str(uri).rstrip("/"))
    try:
        resolve_checkpoint(uri)
    except CheckpointError as e:
        raise TrainSetupError(f"{what}={uri}: {' '.join(str(e).split())}; run `geco train stage1` first or give "
                              "another --bundle") from None
    return uri


def _configured_pseudo_gt(cfg: GecoConfig) -> str:
    """``pseudo_gt.output_uri``: where the pseudo_gt stage writes."""
    return cfg.pseudo_gt.output_uri


def default_inputs(cfg: GecoConfig, *, pseudo_gt: str | None = None, bundle: str | None = None) -> Stage2Inputs:
    """The stage's inputs: ``pseudo_gt`` / ``bundle`` when given, else the pseudo-GT stage's shards
    (:func:`_configured_pseudo_gt`) and ``<stage1.output_uri>/bundle``. The bundle is checked."""
    bundle_uri = checked_bundle(bundle, "--bundle") if bundle else checked_bundle(
        storage.join(cfg.stage1.output_uri, "bundle"), "stage1.output_uri (its bundle/)")
    return Stage2Inputs(pseudo_gt_uri=absolute_uri(pseudo_gt or _configured_pseudo_gt(cfg)), bundle_uri=bundle_uri)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run(cfg: GecoConfig, inputs: Stage2Inputs | None = None, *, parent_run_id: str | None = None) -> Stage2Outputs:
    """Fine-tune the generator of ``inputs.bundle_uri`` on the pseudo-GT at ``inputs.pseudo_gt_uri``
    (``inputs``: :func:`default_inputs` when None); returns where the weights went."""
    inputs = inputs or default_inputs(cfg)
    s2 = cfg.stage2
    job = TrainJob(STAGE, Stage2Task, "stage2.train", log_weights=("bundle",) if s2.log_weights else False)
    run = run_training_stage(
        cfg, STAGE, [job], dataset_uri=inputs.pseudo_gt_uri, output_uri=s2.output_uri, inputs=inputs.task_inputs(),
        parent_run_id=parent_run_id,
        tags={"geco.pseudo_gt_uri": inputs.pseudo_gt_uri, "geco.stage1_bundle_uri": inputs.bundle_uri})
    result = run.results[STAGE]
    return Stage2Outputs(
        uris={k: v for k, v in result.exported.items() if k in ("bundle", "generator")},
        mlflow_run_ids=run.mlflow_run_ids, did_work=run.did_work, seconds=run.seconds,
        output_uri=absolute_uri(s2.output_uri), pseudo_gt_uri=inputs.pseudo_gt_uri,
        source_bundle_uri=inputs.bundle_uri, result=result, val_source=run.info.val_source,
        eval_keys=run.info.eval_keys,
        metrics={k[5:]: float(v) for k, v in result.metrics.items()
                 if k.startswith("eval/") and isinstance(v, (int, float))})
