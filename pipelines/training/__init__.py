"""The Ray Train glue every training stage shares (pretrain, stage 1, stage 2, ...).

A stage writes a :class:`geco.train.loop.TrainTask` (models, one optimiser step, evaluation,
export; pure torch) and a :class:`geco.config.TrainJobConfig` section, then calls
:func:`run_training_stage` with its typed inputs (:mod:`pipelines.stage`).

* :mod:`~pipelines.training.preflight` - what a user can get wrong, checked before anything is
  written (dataset, shards' sizes/hashes, cluster resources, writable outputs): :class:`TrainSetupError`;
* :mod:`~pipelines.training.datasets` - the train/val Ray Datasets (val split or a hash-chosen holdout);
* :mod:`~pipelines.training.driver` - ``TorchTrainer`` set-up, :func:`run_training`, results, the
  "already complete" shortcut, and :func:`run_training_stage`;
* :mod:`~pipelines.training.worker` - the function every Ray Train worker runs (resume, rows,
  steps, evaluation, checkpoints, MLflow from rank 0, export) and the test-only fault hook.
"""
from pipelines.training.datasets import DatasetInfo, holdout_keys, split_info, training_datasets
from pipelines.training.driver import (
    StageRun,
    TrainJob,
    TrainResult,
    absolute_tracking_uri,
    run_training,
    run_training_stage,
)
from pipelines.training.preflight import TrainSetupError, check_cluster, check_dataset, check_resources, preflight
from pipelines.training.worker import RESULT_FILE, log_weights, section

__all__ = [
    "RESULT_FILE", "DatasetInfo", "StageRun", "TrainJob", "TrainResult", "TrainSetupError",
    "absolute_tracking_uri", "check_cluster", "check_dataset", "check_resources", "holdout_keys",
    "log_weights", "preflight", "run_training", "run_training_stage", "section", "split_info", "training_datasets",
]
