"""The train/val Ray Datasets a training stage feeds to Ray Train.

:func:`training_datasets` reads the current samples of the manifest it is given (the one the
pre-flight checked: a stage reads the manifest once) through :func:`pipelines.data.read_shards`:

* validation objects are the manifest's ``val`` split; when it is empty, ``dataset.holdout_fraction``
  of the train objects is held out instead (:func:`holdout_keys`: chosen by a hash of the key, so
  always the same ones, whatever the order or objects added later) and left out of training;
  the validation Dataset holds the first ``eval_objects`` of them in key order;
* the train split is streamed every epoch, or read once into the object store
  (``dataset.training_input``, :func:`should_materialize`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping

from geco.data.shards import current_samples
from pipelines.data import filter_keys, read_shards
from pipelines.training.preflight import TrainSetupError

log = logging.getLogger(__name__)


def _hash_rank(key: str) -> str:
    return hashlib.sha256(b"geco-holdout\x00" + key.encode()).hexdigest()


def holdout_keys(train_keys: list[str], fraction: float) -> set[str]:
    """A stable held-out subset of ``train_keys`` (at least 1 when there are 2+ objects), chosen
    by a hash of each key so it does not depend on the order or on objects added later."""
    keys = sorted(set(train_keys), key=_hash_rank)
    if len(keys) < 2:
        return set()
    n = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    return set(keys[:n])


@dataclass
class DatasetInfo:
    train_objects: int
    val_objects: int
    val_source: str  # "manifest" (the val split) or "holdout" (held out of train by hash)
    eval_keys: list[str]
    train_bytes: int = 0  # the train split's shard bytes
    materialized: bool = False  # the train split was read once into the object store (else streamed)


def should_materialize(mode: str, train_bytes: int) -> bool:
    """``dataset.training_input``: "materialize", "stream", or "auto" (the train split's shards fit
    in a quarter of the Ray cluster's object store)."""
    if mode != "auto":
        return mode == "materialize"
    import ray  # lazy: only "auto" asks the cluster

    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return 0 < train_bytes <= 0.25 * store


def split_info(dataset_uri: str, manifest: Mapping, *, holdout_fraction: float = 0.1,
               eval_objects: int = 4) -> tuple[DatasetInfo, set[str]]:
    """``(info, held)``: which objects train and which evaluate, from the manifest alone (no Ray).

    Validation objects are the manifest's ``val`` split; when it is empty, a ``holdout_fraction``
    of the train objects (``held``) is held out instead and left out of training. ``info.eval_keys``
    are the first ``eval_objects`` validation objects in key order."""
    train_keys = sorted({k for keys in current_samples(manifest, "train").values() for k in keys})
    val_keys = sorted({k for keys in current_samples(manifest, "val").values() for k in keys})
    train_bytes = sum(int(s.get("bytes", 0)) for s in manifest["shards"] if s["split"] == "train")
    if val_keys:
        return DatasetInfo(len(train_keys), len(val_keys), "manifest", val_keys[:eval_objects], train_bytes), set()
    held = holdout_keys(train_keys, holdout_fraction)
    if not held:
        raise TrainSetupError(f"{dataset_uri}: {len(train_keys)} object(s) and no val split: nothing to hold out "
                              "for evaluation (render more objects or set dataset.val_fraction)")
    info = DatasetInfo(len(train_keys) - len(held), len(held), "holdout", sorted(held)[:eval_objects], train_bytes)
    return info, held


def training_datasets(dataset_uri: str, manifest: Mapping, *, holdout_fraction: float = 0.1, eval_objects: int = 4,
                      training_input: str = "stream"):
    """``(train_ds, val_ds, info)``: Ray Datasets of the current samples of ``manifest`` (the latest
    manifest of ``dataset_uri``, as :func:`~pipelines.training.preflight.preflight` returned it),
    split by :func:`split_info`. ``training_input`` (:func:`should_materialize`): stream the train
    split every epoch, or read it once into the object store here (measured on 2 cores: streaming
    costs ~0.2 s a step in read work competing with training; see benchmarks/training.py)."""
    info, held = split_info(dataset_uri, manifest, holdout_fraction=holdout_fraction, eval_objects=eval_objects)
    keep = set(info.eval_keys)
    train_ds = read_shards(dataset_uri, "train", manifest=manifest)
    if info.val_source == "manifest":
        val_ds = filter_keys(read_shards(dataset_uri, "val", manifest=manifest), keep)
    else:
        log.warning("%s: the manifest has no val objects; holding out %d of %d train objects for evaluation",
                    dataset_uri, len(held), info.train_objects + len(held))
        val_ds = filter_keys(train_ds, keep)
        train_ds = filter_keys(train_ds, held, keep=False)
    for ds in (train_ds, val_ds):  # the workers show training progress; Ray Data's bars there only flood the log
        ds.context.enable_progress_bars = False
    if should_materialize(training_input, info.train_bytes):
        log.info("%s: reading the train split (%.1f MB) into the object store", dataset_uri, info.train_bytes / 1e6)
        train_ds.context.execution_options.preserve_order = True  # the same row order on every run: exact resumes
        train_ds = train_ds.materialize()
        info.materialized = True
    return train_ds, val_ds, info
