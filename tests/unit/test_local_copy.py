"""storage.local_copy against the real S3 server: files and prefixes, the ETag+size cache, refreshes,
removals, a crash mid-download, and processes sharing one cache."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from geco import storage


def test_local_paths_are_returned_as_they_are(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert storage.local_copy(str(f), cache_dir=tmp_path / "cache") == f
    assert storage.local_copy(f"file://{tmp_path}") == tmp_path
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="absent"):
        storage.local_copy(str(tmp_path / "absent"))


def _count_downloads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = storage.download

    def counting(uri, local_path):
        calls.append(uri)
        return real(uri, local_path)

    monkeypatch.setattr(storage, "download", counting)
    return calls


@pytest.mark.s3
def test_object_is_cached_by_etag_and_size(s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/weights/model.safetensors"
    storage.write_bytes(uri, b"first")
    calls = _count_downloads(monkeypatch)
    cache = tmp_path / "cache"
    p = storage.local_copy(uri, cache_dir=cache)
    assert p.name == "model.safetensors" and p.read_bytes() == b"first" and p.is_relative_to(cache)
    assert storage.local_copy(uri, cache_dir=cache) == p and len(calls) == 1  # served from the cache
    storage.write_bytes(uri, b"other")  # same size, new content: the ETag tells
    assert storage.local_copy(uri, cache_dir=cache).read_bytes() == b"other" and len(calls) == 2
    p.write_bytes(b"truncated!")  # a local copy of another size is not trusted
    assert storage.local_copy(uri, cache_dir=cache).read_bytes() == b"other" and len(calls) == 3


@pytest.mark.s3
def test_prefix_becomes_a_mirrored_folder(s3_bucket, tmp_path, monkeypatch):
    root = f"{s3_bucket}/teacher"
    storage.write_bytes(f"{root}/model_index.json", b"{}")
    storage.write_bytes(f"{root}/unet/diffusion_pytorch_model.safetensors", b"unet")
    storage.write_bytes(f"{root}/vae/config.json", b"vae")
    calls = _count_downloads(monkeypatch)
    cache = tmp_path / "cache"
    d = storage.local_copy(root + "/", cache_dir=cache)
    assert d.is_dir() and (d / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"unet"
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == [
        "model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]
    assert storage.local_copy(root, cache_dir=cache) == d and len(calls) == 3
    storage.write_bytes(f"{root}/vae/config.json", b"vae2")
    storage.delete(f"{root}/model_index.json")
    storage.local_copy(root, cache_dir=cache)
    assert len(calls) == 4 and (d / "vae" / "config.json").read_bytes() == b"vae2"
    assert not (d / "model_index.json").exists()  # removed on S3, removed from the copy


@pytest.mark.s3
def test_missing_uri_and_crash_mid_download(s3_bucket, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing under this S3 prefix"):
        storage.local_copy(f"{s3_bucket}/absent", cache_dir=tmp_path)
    uri = f"{s3_bucket}/m.bin"
    storage.write_bytes(uri, b"payload")
    real = storage.download

    def crash(src, dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        Path(dst).write_bytes(b"pay")  # as if killed after a partial write to the final name
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "download", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.local_copy(uri, cache_dir=tmp_path)
    monkeypatch.setattr(storage, "download", real)
    assert storage.local_copy(uri, cache_dir=tmp_path).read_bytes() == b"payload"  # no meta: fetched again


def _copy_in_child(uri, cache, env, out):
    os.environ.update(env)
    p = storage.local_copy(uri, cache_dir=cache)
    out.put((str(p), p.read_bytes()))


@pytest.mark.s3
def test_processes_sharing_a_cache(s3_bucket, s3_server, tmp_path):
    uri = f"{s3_bucket}/big.bin"
    data = os.urandom(3 << 20)
    storage.write_bytes(uri, data)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_copy_in_child, args=(uri, str(tmp_path), s3_server.env(), out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert {r[0] for r in results} == {str(storage.local_copy(uri, cache_dir=tmp_path))}
    assert all(r[1] == data for r in results)
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
