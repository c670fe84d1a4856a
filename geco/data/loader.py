"""Streaming readers of committed shards (local paths and ``s3://``), for training, benchmarks and tests.

* :func:`iter_samples` - the ``webdataset`` package's tar parsing and key grouping over shards
  opened through :func:`geco.storage.open_read` (S3 objects are streamed with boto3; no aws CLI),
  yielding :func:`~geco.data.schema.decode_sample` dicts (or raw samples with ``decode=False``).
* :func:`shard_uris_from_manifest` / :func:`manifest_filter` - which shards and which samples of
  them are current for a split, from the latest manifest.

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

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from geco import storage
from geco.data.schema import decode_sample
from geco.data.shards import current_samples, read_latest_manifest

__all__ = [
    "iter_dataset",
    "iter_raw_samples",
    "iter_samples",
    "manifest_filter",
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
