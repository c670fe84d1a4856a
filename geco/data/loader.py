"""Streaming readers of committed shards (local paths and ``s3://``), for training and tests.

* :func:`iter_samples` - the ``webdataset`` package's tar parsing and key grouping over shards
  opened through :func:`geco.storage.open_read` (S3 objects are streamed with boto3; no aws CLI),
  yielding :func:`~geco.data.schema.decode_sample` dicts (or raw samples with ``decode=False``).
* :func:`shard_uris_from_manifest` / :func:`manifest_filter` - which shards and which samples of
  them are current for a split, from the latest manifest.
* :class:`ShardDataset` - a ``torch.utils.data.IterableDataset`` that splits shards (or samples,
  when there are fewer shards than readers) over distributed ranks and DataLoader workers.
* :func:`register_s3_gopen` - lets plain ``webdataset.WebDataset("s3://...")`` open S3 shards
  through :mod:`geco.storage` too.

Ray Data. ``ray.data.read_webdataset`` (Ray 2.60) decodes by default (``decoder=True``): PNG ->
uint8 ``ndarray`` [H,W,C], ``.npy`` -> ``ndarray``, ``.json`` -> parsed object, then goes through
pandas/Arrow, where lists of dicts (``cameras.json``) come back as numpy object arrays and
columns absent from some rows are filled with ``None``/NaN. :func:`decode_sample` copes with all
of that, but the robust and cheaper way is to keep bytes and decode in the training loop::

    ds = ray.data.read_webdataset(shard_uris_from_manifest(out, "train"), decoder=None)
    keep = manifest_filter(read_latest_manifest(out), "train")      # drop superseded samples
    ds = ds.filter(lambda row: keep(row["__url__"], row["__key__"]))  # only after re-renders
    ...
    for row in ds.iter_rows():            # {"__key__", "__url__", "cond.png": bytes, ...}
        sample = decode_sample(row, background=(1, 1, 1))

(With S3 shards give Ray a ``pyarrow.fs.S3FileSystem(endpoint_override=...)`` or set
``AWS_ENDPOINT_URL``.)
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from geco import storage
from geco.data.schema import decode_sample
from geco.data.shards import current_samples, read_latest_manifest

__all__ = [
    "ShardDataset",
    "iter_dataset",
    "iter_raw_samples",
    "iter_samples",
    "manifest_filter",
    "register_s3_gopen",
    "shard_uris_from_manifest",
]


# --------------------------------------------------------------------------------------------
# manifest -> shards
# --------------------------------------------------------------------------------------------
def shard_uris_from_manifest(output: str, split: str | None = "train", manifest: Mapping | None = None) -> list[str]:
    """URIs of the shards of the latest manifest holding current samples of ``split``
    (``None``: all splits). Raises ``FileNotFoundError`` when no manifest exists yet."""
    manifest = manifest if manifest is not None else read_latest_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"no manifest under {storage.join(output, 'manifest')}; render first")
    live = current_samples(manifest, split)
    return [storage.join(output, s["name"]) for s in manifest["shards"] if s["name"] in live]


def manifest_filter(manifest: Mapping, split: str | None = None) -> Callable[[str, str], bool]:
    """A predicate ``keep(shard_url_or_name, key)`` that is true for current samples of ``split``
    (superseded copies of re-rendered objects and other splits are dropped)."""
    live = current_samples(manifest, split)

    def keep(url: str, key: str) -> bool:
        return key in live.get(storage.basename(str(url)), ())

    return keep


# --------------------------------------------------------------------------------------------
# opening shards
# --------------------------------------------------------------------------------------------
def _open_shards(urls: Iterable[str]) -> Iterator[dict]:
    """``{"url", "stream"}`` per shard for webdataset's tar expander; each stream is closed when
    the next one is requested (i.e. after its tar was read to the end) or on generator close."""
    for url in urls:
        with storage.open_read(url) as stream:
            yield {"url": url, "stream": stream}


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


def iter_raw_samples(shard_uris: Iterable[str], keep: Callable[[str, str], bool] | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", member: bytes, ...}`` of the shards, in order."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander(_open_shards(shard_uris))
    for sample in group_by_keys(files):
        if keep is None or keep(sample["__url__"], sample["__key__"]):
            yield sample


def iter_samples(shard_uris: Iterable[str], *, decode: bool = True, background=(1.0, 1.0, 1.0), views="all",
                 with_depth: bool = True, with_normals: bool = True,
                 keep: Callable[[str, str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the samples of ``shard_uris`` (local or ``s3://``) in order, decoded with
    :func:`decode_sample` (``decode=False``: raw byte samples). ``keep(url, key)`` filters
    samples before decoding (see :func:`manifest_filter`)."""
    for sample in iter_raw_samples(shard_uris, keep):
        if decode:
            yield decode_sample(sample, background=background, views=views, with_depth=with_depth,
                                with_normals=with_normals)
        else:
            yield sample


def iter_dataset(output: str, split: str | None = "train", **kwargs) -> Iterator[dict[str, Any]]:
    """The current samples of ``split`` in the dataset at ``output`` (latest manifest; each
    object once, superseded copies skipped); ``kwargs`` as for :func:`iter_samples`."""
    manifest = read_latest_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output}: no manifest; run `geco render` first")
    uris = shard_uris_from_manifest(output, split, manifest=manifest)
    yield from iter_samples(uris, keep=manifest_filter(manifest, split), **kwargs)


# --------------------------------------------------------------------------------------------
# torch IterableDataset
# --------------------------------------------------------------------------------------------
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
