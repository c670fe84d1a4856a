"""DAG stage `stage1`: VSD distillation of the frozen teacher into the one-step generator.

    teacher / reconstructor sources: stage1.teacher / stage1.reconstructor      [driver]
        ("" = models.*; "pretrain" = the pretrain stage's output; or a URI)
    pre-flight: dataset, the cluster's CPUs/GPUs, output/storage writable          [driver]
    train/val Ray Datasets from the manifest (val split, or a hash-chosen holdout) [Ray Data]
    MLflow: a `<name>/stage1` run (child of the DAG's run when parent_run_id is given), the
        config as params, per-step losses and both learning rates (train/...), held-out
        metrics (eval/...) and sample grids (samples/step_NNNNNNNN.png), the bundle as artifacts
    a Ray Train job (pipelines.train_common.run_training) running
        geco.train.stage1.VSDTask  -> <stage1.output_uri>/generator/  (diffusers UNet + generator.json)
                                   -> <stage1.output_uri>/bundle/     (GECO checkpoint: `geco generate`)

Re-running resumes from the latest checkpoint (the Ray Train run name is derived from the config
name, the teacher and the model architecture); a run that already reached its steps only reports
its outputs. ``stage1.fsdp`` asks the glue for FSDP on the generator (GPU workers).
Feed the generator to later stages with :meth:`Stage1Outputs.overrides`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from geco.config import GecoConfig
from geco.tracking import start_run
from pipelines.train_common import (
    TrainResult,
    TrainSetupError,
    absolute_uri,
    preflight,
    run_training,
    training_datasets,
)

STAGE = "stage1"


@dataclass
class Stage1Outputs:
    output_uri: str
    bundle_uri: str | None = None  # the GECO checkpoint (teacher encoders + generator + reconstructor)
    generator_uri: str | None = None  # the generator alone (save_generator layout)
    teacher_uri: str = ""  # the teacher that was distilled ("" = a tiny random one)
    reconstructor_uri: str = ""  # the reconstructor in the bundle ("" = a tiny random one)
    metrics: dict[str, float] = field(default_factory=dict)  # the final held-out metrics (eval/ stripped)
    result: TrainResult | None = None
    val_source: str = ""  # "manifest" or "holdout"
    eval_keys: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def overrides(self) -> list[str]:
        """``--set`` overrides that point later stages at the generator trained here."""
        return [f"models.generator.pretrained={self.generator_uri}"] if self.generator_uri else []

    def summary(self) -> str:
        lines = [f"stage1: evaluated on {len(self.eval_keys)} {self.val_source} object(s) in {self.seconds:.1f} s",
                 f"  teacher: {self.teacher_uri or 'tiny random'}"]
        if self.result is not None:
            lines.append("  " + self.result.summary().replace("\n", "\n  "))
        if self.mlflow_run_id:
            lines.append(f"  mlflow run: {self.mlflow_run_id}")
        return "\n".join(lines)



def _log_bundle(cfg: GecoConfig, run_id: str, uri: str) -> None:
    from pipelines.train_common import RunLogger, _log_weights, absolute_tracking_uri

    _log_weights(RunLogger(absolute_tracking_uri(cfg.tracking.uri), run_id), "bundle", uri)


def run(cfg: GecoConfig, parent_run_id: str | None = None) -> Stage1Outputs:
    """Distil the configured teacher into the one-step generator; returns where the weights went."""
    from geco.train.stage1 import VSDTask, resolve_sources

    t0 = time.perf_counter()
    try:
        cfg = resolve_sources(cfg)
    except FileNotFoundError as e:
        raise TrainSetupError(str(e)) from None
    s1 = cfg.stage1
    out_uri = absolute_uri(s1.output_uri)
    outputs = Stage1Outputs(output_uri=out_uri, teacher_uri=cfg.models.teacher.pretrained,
                            reconstructor_uri=cfg.models.reconstructor.pretrained)
    # the dataset, the cluster's CPUs/GPUs and the output folders, before any run is opened
    preflight(cfg, ["stage1.train"], dataset_uri=cfg.dataset.uri, output_uri=out_uri)
    train_ds, val_ds, info = training_datasets(cfg.dataset.uri, holdout_fraction=s1.holdout_fraction,
                                               eval_objects=s1.train.eval_objects, training_input=cfg.dataset.training_input)
    outputs.val_source, outputs.eval_keys = info.val_source, info.eval_keys
    fsdp = s1.fsdp and s1.train.num_workers > 1

    with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}", parent_run_id=parent_run_id,
                   tags={"geco.stage": STAGE}) as tracker:
        outputs.mlflow_run_id = tracker.run_id
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.set_tags({"geco.dataset_uri": cfg.dataset.uri, "geco.teacher_uri": outputs.teacher_uri or "tiny random",
                          "geco.reconstructor_uri": outputs.reconstructor_uri or "tiny random",
                          "geco.stage1.val_source": info.val_source, "geco.stage1.eval_keys": ",".join(info.eval_keys),
                          "geco.stage1.parallel": "fsdp" if fsdp else "ddp",
                          "geco.training_input": "materialized" if info.materialized else "streamed"})
        tracker.log_metrics({"train_objects": info.train_objects, "val_objects": info.val_objects})
        result = run_training(VSDTask, cfg, "stage1.train", stage=STAGE, datasets={"train": train_ds, "val": val_ds},
                              output_uri=out_uri, tracker=tracker, log_weights=False,
                              parallel_strategy="fsdp" if fsdp else "ddp",
                              parallel_strategy_kwargs={"use_orig_params": True} if fsdp else None)
        outputs.result = result
        outputs.bundle_uri = result.exported.get("bundle")
        outputs.generator_uri = result.exported.get("generator")
        outputs.metrics = {k[5:]: float(v) for k, v in result.metrics.items()
                           if k.startswith("eval/") and isinstance(v, (int, float))}
        tracker.set_tags({"geco.bundle_uri": outputs.bundle_uri or "", "geco.generator_uri": outputs.generator_uri or ""})
        if s1.log_weights and tracker.enabled and outputs.bundle_uri and not result.already_complete:
            _log_bundle(cfg, tracker.run_id, outputs.bundle_uri)
        outputs.seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": outputs.seconds})
    return outputs
