"""Reading committed shards as a Ray Dataset — what the training stages feed to Ray Train.

    ds = read_shards("s3://bucket/shards", split="train")       # rows: __key__, __url__, bytes
    ... ray.train.get_dataset_shard("train").iter_rows() → geco.data.schema.decode_sample(row)

Ray Data streams and re-reads blocks when a worker restarts, which is why training reads through
it rather than a hand-rolled reader. Rows keep raw bytes (``decoder=None``) and are decoded in the
training loop with :func:`geco.data.schema.decode_sample`, so decoding follows our conventions
(background compositing, OpenCV cameras) in one place.
"""
from __future__ import annotations

from typing import Mapping

from geco import storage
from geco.data.loader import manifest_filter, shard_uris_from_manifest
from geco.data.shards import read_latest_manifest
from pipelines.cluster import s3_filesystem


def read_shards(dataset_uri: str, split: str | None = "train", *, manifest: Mapping | None = None):
    """The current samples of ``split`` in ``manifest`` (default: the latest one of ``dataset_uri``;
    a training stage passes the one its pre-flight read), as a ``ray.data.Dataset``."""
    import ray  # lazy: importing Ray costs seconds, and this module is imported by the CLI's stages

    manifest = manifest if manifest is not None else read_latest_manifest(dataset_uri)
    if manifest is None:
        raise FileNotFoundError(f"{dataset_uri}: no manifest; run `geco render` first")
    uris = shard_uris_from_manifest(dataset_uri, split, manifest=manifest)
    if not uris:
        raise FileNotFoundError(f"{dataset_uri}: the latest manifest has no {split!r} samples")
    fs = s3_filesystem() if storage.is_s3(dataset_uri) else None
    paths = [u[len("s3://"):] for u in uris] if fs is not None else uris
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, include_paths=True)
    if not any(s.get("superseded") for s in manifest["shards"] if split is None or s["split"] == split):
        return ds  # no re-rendered objects in these shards (one split per shard): every row is current
    keep = manifest_filter(manifest, split)  # re-rendered objects: drop the old copies (row by row)
    return ds.filter(lambda row: keep(row["__url__"] if "__url__" in row else row.get("path", ""), row["__key__"]))


def filter_keys(ds, keys, *, keep: bool = True):
    """``ds`` with only (``keep``) or without the rows whose ``__key__`` is in ``keys``, filtered
    in Arrow (a Python row filter would copy every row's image bytes in and out of Python)."""
    from ray.data.expressions import col

    values = sorted(keys)
    return ds.filter(expr=col("__key__").is_in(values) if keep else col("__key__").not_in(values))
