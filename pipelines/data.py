"""Reading committed shards as a Ray Dataset — what the training stages feed to Ray Train.

    ds = read_shards("s3://bucket/shards", split="train")       # rows: __key__, __url__, bytes
    ... ray.train.get_dataset_shard("train").iter_rows() → geco.data.schema.decode_sample(row)

Ray Data streams and re-reads blocks when a worker restarts, which is why training reads through
it rather than a hand-rolled reader. Rows keep raw bytes (``decoder=None``) and are decoded in the
training loop with :func:`geco.data.schema.decode_sample`, so decoding follows our conventions
(background compositing, OpenCV cameras) in one place.
"""
from __future__ import annotations

import os

from geco import storage
from geco.data.loader import manifest_filter, shard_uris_from_manifest
from geco.data.shards import read_latest_manifest


def _filesystem(uri: str):
    """A pyarrow S3 filesystem for the endpoint in the standard AWS environment (or None)."""
    if not storage.is_s3(uri):
        return None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    return pyarrow.fs.S3FileSystem(**kwargs)


def read_shards(dataset_uri: str, split: str | None = "train"):
    """The current samples of ``split`` in the latest manifest, as a ``ray.data.Dataset``."""
    import ray

    manifest = read_latest_manifest(dataset_uri)
    if manifest is None:
        raise FileNotFoundError(f"{dataset_uri}: no manifest; run `geco render` first")
    uris = shard_uris_from_manifest(dataset_uri, split, manifest=manifest)
    if not uris:
        raise FileNotFoundError(f"{dataset_uri}: the latest manifest has no {split!r} samples")
    fs = _filesystem(dataset_uri)
    paths = [u[len("s3://"):] for u in uris] if fs is not None else uris
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, include_paths=True)
    keep = manifest_filter(manifest, split)
    return ds.filter(lambda row: keep(row["__url__"] if "__url__" in row else row.get("path", ""), row["__key__"]))
