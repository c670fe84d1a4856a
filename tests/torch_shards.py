"""Torch ``DataLoader`` and plain ``webdataset`` readers of committed shards, for tests only.

The project trains through Ray Data (:mod:`pipelines.data`); these check that the shards are
ordinary WebDataset shards that other readers can use too:

* :class:`ShardDataset` - a ``torch.utils.data.IterableDataset`` that splits shards (or samples,
  when there are fewer shards than readers) over distributed ranks and DataLoader workers;
* :func:`collate_samples` - batches decoded samples for a DataLoader;
* :func:`register_s3_gopen` - lets plain ``webdataset.WebDataset("s3://...")`` open S3 shards
  through :mod:`geco.storage`.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from geco import storage
from geco.data.loader import iter_raw_samples, manifest_filter, shard_uris_from_manifest
from geco.data.schema import decode_sample
from geco.data.shards import read_latest_manifest


class _ClosingStream:
    """A file-like wrapper around a storage.open_read context that closes it with the stream."""

    def __init__(self, url: str):
        self._cm = storage.open_read(url)
        self._f = self._cm.__enter__()

    def read(self, *args):
        return self._f.read(*args)

    def close(self):
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def register_s3_gopen() -> None:
    """Make ``webdataset.gopen`` open ``s3://`` URLs with boto3 via :mod:`geco.storage`
    (webdataset itself has no s3 handler; its ``pipe:`` recipes need the aws CLI)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode != "rb":
            raise ValueError(f"{url}: geco's s3 handler only reads (write shards with ShardWriter)")
        return _ClosingStream(url)

    gopen.gopen_schemes["s3"] = gopen_s3


def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch decoded samples: tensors are stacked (recursively in groups), everything else
    (keys, names, cameras, meta) becomes a list. All samples must have the same groups/shapes."""
    if not batch:
        raise ValueError("empty batch")
    out: dict[str, Any] = {}
    for field in batch[0]:
        values = [b[field] for b in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[field] = torch.stack(values)
        elif isinstance(first, Mapping) and any(isinstance(v, torch.Tensor) for v in first.values()):
            out[field] = collate_samples(values)
        else:
            out[field] = list(values)
    return out


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of a list of shards (or of one split of the latest manifest) for a DataLoader.

    Reader ``r`` of ``R = world_size * num_workers`` (``r = rank * num_workers + worker_id``)
    reads shards ``r, r+R, ...`` when there are at least ``R`` shards; otherwise every reader
    streams all shards and keeps samples ``r, r+R, ...`` so none is read twice. ``shuffle``
    reorders shards per epoch (seeded by ``seed + epoch``: call :meth:`set_epoch`) and samples
    through a buffer of ``shuffle_buffer``. Rank / world size come from the arguments,
    ``torch.distributed`` or the ``RANK``/``WORLD_SIZE`` variables.

    Note: Ray Data (``read_webdataset`` -> ``ray.train.get_dataset_shard``) is the project's
    training reader and the one that survives worker restarts; this dataset restarts an epoch
    from its beginning.
    """

    def __init__(self, shard_uris: Sequence[str] | None = None, *, output: str | None = None,
                 split: str | None = "train", rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, shuffle_buffer: int = 64, seed: int = 0, decode: bool = True,
                 **decode_kwargs):
        if (shard_uris is None) == (output is None):
            raise ValueError("give either shard_uris or output (to read the latest manifest)")
        self.keep = None
        if output is not None:
            manifest = read_latest_manifest(output)
            if manifest is None:
                raise FileNotFoundError(f"no manifest under {output}")
            shard_uris = shard_uris_from_manifest(output, split, manifest)
            self.keep = manifest_filter(manifest, split)
        self.shard_uris = list(shard_uris)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.shuffle, self.shuffle_buffer, self.seed, self.epoch = shuffle, shuffle_buffer, seed, 0
        self.decode, self.decode_kwargs = decode, decode_kwargs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._reader()
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        uris = list(self.shard_uris)
        if self.shuffle:
            rng.shuffle(uris)
        if len(uris) >= readers:
            samples = iter_raw_samples(uris[reader::readers], self.keep)
        else:
            samples = islice(iter_raw_samples(uris, self.keep), reader, None, readers)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for sample in samples:
            yield decode_sample(sample, **self.decode_kwargs) if self.decode else sample


def _buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf
