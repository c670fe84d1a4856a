"""DAG stage `pretrain`: train a teacher and/or a reconstructor from the render shards.

    targets = [t in cfg.pretrain.targets whose models.<t>.pretrained is empty]      [driver]
    pre-flight: dataset, the cluster's CPUs/GPUs per job, output/storage writable   [driver]
    train/val Ray Datasets from the manifest (val split, or a hash-chosen holdout)  [Ray Data]
    MLflow: a `<name>/pretrain` run (child of the DAG's run), one child run per target
    per target: a Ray Train job (pipelines.train_common.run_training) running
        geco.train.pretrain.TeacherPretrainTask        -> <output_uri>/teacher/ (Zero123++ layout)
        geco.train.pretrain.ReconstructorPretrainTask  -> <output_uri>/reconstructor/model.safetensors

Re-running resumes each job from its latest checkpoint (the Ray Train run name is derived from
the config name and the model architecture); a job that already reached its steps only exports.
The outputs carry the weights' URIs: feed them to later stages with
``--set models.teacher.pretrained=... --set models.reconstructor.pretrained=...``
(:meth:`PretrainOutputs.overrides`).
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

STAGE = "pretrain"


@dataclass
class PretrainOutputs:
    output_uri: str
    teacher_uri: str | None = None  # a Zero123++ folder (None: not trained here)
    reconstructor_uri: str | None = None  # LGM-layout safetensors (None: not trained here)
    results: dict[str, TrainResult] = field(default_factory=dict)  # per target
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it was not trained
    val_source: str = ""  # "manifest" or "holdout"
    eval_keys: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def overrides(self) -> list[str]:
        """``--set`` overrides that point later stages at the weights trained here."""
        out = []
        if self.teacher_uri:
            out.append(f"models.teacher.pretrained={self.teacher_uri}")
        if self.reconstructor_uri:
            out.append(f"models.reconstructor.pretrained={self.reconstructor_uri}")
        return out

    def summary(self) -> str:
        done = sum(not r.already_complete for r in self.results.values())
        lines = [f"pretrain: {done} model(s) trained, {len(self.results) - done} already complete, in {self.seconds:.1f} s "
                 f"(evaluated on {len(self.eval_keys)} {self.val_source} object(s))"]
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


def run(cfg: GecoConfig, *, parent_run_id: str | None = None, targets: list[str] | None = None) -> PretrainOutputs:
    """Train the configured targets (``targets`` narrows ``cfg.pretrain.targets``); returns where
    the weights went."""
    from geco.train.pretrain import TASKS

    t0 = time.perf_counter()
    if targets is not None:
        unknown = set(targets) - set(TASKS)
        if unknown:
            raise TrainSetupError(f"unknown pretrain target(s) {sorted(unknown)}; choose from {sorted(TASKS)}")
        cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"targets": list(targets)})})
    todo, skipped = plan(cfg)
    out_uri = absolute_uri(cfg.pretrain.output_uri)
    outputs = PretrainOutputs(output_uri=out_uri, skipped=skipped)
    if not todo:
        outputs.seconds = time.perf_counter() - t0
        return outputs
    # the dataset, the cluster's CPUs/GPUs and the output folders, before any run is opened
    preflight(cfg, [f"pretrain.{t}" for t in todo], dataset_uri=cfg.dataset.uri, output_uri=out_uri,
              concurrent=cfg.pretrain.concurrent)

    def datasets(target: str) -> dict:
        # one Dataset per job: concurrent jobs never share an execution
        train_ds, val_ds, info = training_datasets(cfg.dataset.uri, holdout_fraction=cfg.pretrain.holdout_fraction,
                                                   eval_objects=getattr(cfg.pretrain, target).eval_objects,
                                                   training_input=cfg.dataset.training_input)
        outputs.val_source, outputs.eval_keys = info.val_source, info.eval_keys
        return {"train": train_ds, "val": val_ds, "info": info}

    data = {t: datasets(t) for t in todo}
    info = data[todo[0]]["info"]

    with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}", parent_run_id=parent_run_id,
                   tags={"geco.stage": STAGE}) as tracker:
        outputs.mlflow_run_id = tracker.run_id
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.set_tags({"geco.dataset_uri": cfg.dataset.uri, "geco.pretrain.val_source": info.val_source,
                          "geco.pretrain.eval_keys": ",".join(info.eval_keys),
                          "geco.training_input": "materialized" if info.materialized else "streamed"})
        tracker.log_metrics({"train_objects": info.train_objects, "val_objects": info.val_objects})

        def train(target: str) -> TrainResult:
            # a child MLflow run per job (MLflow's active-run stack is per thread: safe concurrently)
            with start_run(cfg.tracking, run_name=f"{cfg.name}/{STAGE}/{target}", parent_run_id=tracker.run_id,
                           tags={"geco.stage": f"{STAGE}/{target}"}) as child:
                child.log_params(cfg.model_dump(mode="json"))
                result = run_training(TASKS[target], cfg, f"pretrain.{target}", stage=f"{STAGE}-{target}",
                                      datasets={k: data[target][k] for k in ("train", "val")}, output_uri=out_uri,
                                      tracker=child, log_weights=cfg.pretrain.log_weights)
                child.set_tags({f"geco.{target}_uri": result.exported.get(target, "")})
            return result

        if cfg.pretrain.concurrent and len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(todo), thread_name_prefix="geco-pretrain") as pool:
                futures = {t: pool.submit(train, t) for t in todo}
                results = {t: f.result() for t, f in futures.items()}
        else:
            results = {t: train(t) for t in todo}
        for target, result in results.items():
            outputs.results[target] = result
            uri = result.exported.get(target)
            if target == "teacher":
                outputs.teacher_uri = uri
            else:
                outputs.reconstructor_uri = uri
            tracker.set_tags({f"geco.{target}_uri": uri or ""})
        outputs.seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": outputs.seconds})
    return outputs
