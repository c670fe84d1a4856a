"""Shard schema, writer, manifest, failures and reader: the contracts the render and training
stages rely on (local files; one test over the local S3 server)."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geco.cameras import Camera, sample_object_cameras
from geco.data.loader import (
    iter_raw_samples,
    iter_samples,
    manifest_filter,
    shard_uris_from_manifest,
)
from geco.data.schema import (
    MAX_KEY_LEN,
    SampleError,
    decode_sample,
    member_names,
    sample_from_dir,
    sample_from_members,
    sanitize_object_id,
    view_names,
)
from geco.data.shards import (
    ShardExistsError,
    ShardWriter,
    clean_stale_temporaries,
    committed_state,
    list_manifest_versions,
    read_failures,
    read_latest_manifest,
    read_manifest,
    split_for,
    write_failures,
    write_manifest_version,
)
from tests.torch_shards import ShardDataset, collate_samples, register_s3_gopen

NUM_RANDOM = 2
RES = {"cond": 16, "zero123": 12, "random": 8}


# ------------------------------------------------------------------------------------------
# synthetic rendered objects
# ------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _view_members(name: str, size: int, rng: np.random.Generator) -> dict[str, bytes]:
    """RGBA with a disc of the object: alpha 255 inside, 128 on a ring, 0 outside."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    alpha = np.where(r < size * 0.3, 255, np.where(r < size * 0.4, 128, 0)).astype(np.uint8)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    depth = np.where(alpha > 0, 1.0 + r / size, 0.0).astype(np.float16)
    n = np.zeros((size, size, 3))
    n[..., 2] = 1.0
    normal = np.round((n + 1) / 2 * 255).astype(np.uint8)
    return {f"{name}.png": _png(np.dstack([rgb, alpha])), f"{name}.depth.npy": _npy(depth),
            f"{name}.normal.png": _png(normal)}


def make_members(object_id: str, seed: int = 0) -> dict[str, bytes]:
    cams = sample_object_cameras(object_id, seed, cond_resolution=RES["cond"], z123_resolution=RES["zero123"],
                                 num_random=NUM_RANDOM, random_resolution=RES["random"])
    # zlib.crc32, not hash(): hash() of a str changes per process; the same object must get the same pixels
    rng = np.random.default_rng(zlib.crc32(f"{object_id}/{seed}".encode()))
    names = ["cond", *view_names(len(cams) - 1)]
    members: dict[str, bytes] = {}
    cam_dicts = []
    for name, cam in zip(names, cams):
        members.update(_view_members(name, cam.width, rng))
        cam_dicts.append({**cam.to_dict(), "name": name})
    members["cameras.json"] = json.dumps(cam_dicts).encode()
    members["meta.json"] = json.dumps({"source_uri": f"procedural://{object_id}", "content_hash": f"h-{seed}"}).encode()
    return members


def make_dir(root: Path, object_id: str, seed: int = 0) -> Path:
    d = root / sanitize_object_id(object_id)
    d.mkdir(parents=True)
    for name, data in make_members(object_id, seed).items():
        (d / name).write_bytes(data)
    return d


def write_objects(out, ids, per_shard=2, start=0, val_fraction=0.0, seed=0):
    with ShardWriter(str(out), per_shard, start) as w:
        for oid in ids:
            s = sample_from_members(oid, make_members(oid, seed))
            w.add(s, f"h-{seed}", split_for(s["__key__"], val_fraction))
    return w.committed


# ------------------------------------------------------------------------------------------
# keys and schema
# ------------------------------------------------------------------------------------------
def test_sanitize_object_id():
    assert sanitize_object_id("8476c4170df24cf5bbe6967222d1a42d") == "8476c4170df24cf5bbe6967222d1a42d"
    assert sanitize_object_id("Android_Figure_Panda") == "Android_Figure_Panda"
    tricky = ["../../etc/passwd", "a.b", "a/b", "a b", "chair.glb", "..", ".", "-rf", "椅子", "Ünïcödé", "x" * 300,
              "a\x00b", "models/chair.glb", "models_chair_glb"]
    keys = [sanitize_object_id(t) for t in tricky]
    for raw, k in zip(tricky, keys):
        assert 0 < len(k) <= MAX_KEY_LEN and all(c.isascii() and (c.isalnum() or c in "_-") for c in k), (raw, k)
        assert "." not in k and "/" not in k and not k.startswith("-")
        assert sanitize_object_id(k) == k  # idempotent
    assert len(set(keys)) == len(keys)  # "models/chair.glb" vs "models_chair_glb" etc. don't collide
    assert sanitize_object_id("a.b") != sanitize_object_id("a_b") != sanitize_object_id("a/b")
    assert sanitize_object_id("x" * 300) != sanitize_object_id("x" * 301)
    assert sanitize_object_id("Ünïcödé").startswith("Unicode-")
    with pytest.raises(ValueError):
        sanitize_object_id("")


def test_sample_from_dir_and_validation(tmp_path):
    d = make_dir(tmp_path, "obj/1.glb")
    s = sample_from_dir("obj/1.glb", d)
    assert s["__key__"] == sanitize_object_id("obj/1.glb")
    assert sorted(k for k in s if k != "__key__") == member_names(6 + NUM_RANDOM)
    members = make_members("o")
    for drop in ("cameras.json", "003.depth.npy", "cond.png", "007.normal.png"):
        bad = {k: v for k, v in members.items() if k != drop}
        with pytest.raises(SampleError, match=drop.replace(".", r"\.")):
            sample_from_members("o", bad)
    with pytest.raises(SampleError, match="not a PNG"):
        sample_from_members("o", {**members, "000.png": b"nope"})
    with pytest.raises(SampleError, match="without a camera"):
        sample_from_members("o", {**members, "042.png": members["000.png"]})
    # depth/normals optional on request
    lean = {k: v for k, v in members.items() if "depth" not in k and "normal" not in k}
    assert sample_from_members("o", lean, require_depth=False, require_normals=False)["__key__"] == "o"


def test_decode_conventions():
    members = make_members("obj-a")
    sample = {"__key__": "obj-a", **members}
    white = decode_sample(sample)
    black = decode_sample(sample, background=(0.0, 0.0, 0.0))
    raw = decode_sample(sample, background=None)
    c = RES["cond"]
    assert white["cond_rgb"].shape == (3, c, c) and white["cond_alpha"].shape == (1, c, c)
    assert white["cond_K"].shape == (3, 3) and white["cond_w2c"].shape == (4, 4)
    z, r = white["zero123"], white["random"]
    assert z["names"] == view_names(6) and r["names"] == ["006", "007"]
    assert z["rgb"].shape == (6, 3, 12, 12) and z["alpha"].shape == (6, 1, 12, 12)
    assert z["depth"].shape == (6, 1, 12, 12) and z["depth"].dtype == torch.float32
    assert z["normal"].shape == (6, 3, 12, 12) and z["K"].shape == (6, 3, 3) and z["w2c"].shape == (6, 4, 4)
    assert r["rgb"].shape == (NUM_RANDOM, 3, 8, 8)
    # compositing: only where alpha < 1, and towards the background colour
    for g in ("zero123", "random"):
        a = white[g]["alpha"].expand_as(white[g]["rgb"])
        diff = (white[g]["rgb"] - black[g]["rgb"]).abs()
        assert torch.equal(white[g]["rgb"][a == 1], raw[g]["rgb"][a == 1])
        assert diff[a == 1].max() == 0 and diff[a < 1].min() > 0
        assert torch.all(white[g]["rgb"][a == 0] == 1) and torch.all(black[g]["rgb"][a == 0] == 0)
        assert torch.allclose(diff[a < 1], 1 - a[a < 1])
        assert 0 <= white[g]["rgb"].min() and white[g]["rgb"].max() <= 1
        # depth: 0 exactly where there is no surface, positive on it; normals in [-1,1], 0 off-surface
        d, al = white[g]["depth"], white[g]["alpha"]
        assert torch.all(d[al == 0] == 0) and torch.all(d[al > 0] > 0)
        n = white[g]["normal"]
        assert n.min() >= -1 and n.max() <= 1
        assert torch.all(n[al.expand_as(n) == 0] == 0)
        assert torch.allclose(n[:, 2][al[:, 0] > 0], torch.ones(1), atol=1e-2)
    # matrices agree with the camera module
    cams = json.loads(members["cameras.json"])
    cam3 = Camera.from_dict(cams[4])
    assert torch.allclose(white["zero123"]["K"][3], torch.tensor(cam3.K, dtype=torch.float32))
    assert torch.allclose(white["zero123"]["w2c"][3], torch.tensor(cam3.w2c_opencv, dtype=torch.float32), atol=1e-6)
    # view selection, no depth/normals
    sel = decode_sample(sample, views=[1, "007"], with_depth=False, with_normals=False)
    assert sel["zero123"]["names"] == ["001"] and sel["random"]["names"] == ["007"]
    assert "depth" not in sel["zero123"] and "cond_depth" not in sel
    assert "zero123" not in decode_sample(sample, views="none")
    # a batch of decoded samples
    batch = collate_samples([white, black])
    assert batch["zero123"]["rgb"].shape == (2, 6, 3, 12, 12) and batch["key"] == ["obj-a", "obj-a"]


def test_decode_accepts_ray_default_decoder_rows():
    """ray.data.read_webdataset decodes by default (PNG -> array, json -> object): same result."""
    wds = pytest.importorskip("ray.data._internal.datasource.webdataset_datasource")
    sample = {"__key__": "obj-r", **make_members("obj-r")}
    pre = wds._default_decoder(dict(sample))
    assert isinstance(pre["cond.png"], np.ndarray) and isinstance(pre["cameras.json"], list)
    a, b = decode_sample(sample), decode_sample(pre)
    for g in ("zero123", "random"):
        for f in ("rgb", "alpha", "depth", "normal", "K", "w2c"):
            assert torch.equal(a[g][f], b[g][f]), (g, f)
    assert torch.equal(a["cond_rgb"], b["cond_rgb"])


# ------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------
def test_round_trip_with_webdataset(tmp_path):
    import webdataset as wds

    ids = [f"obj.{i}" for i in range(5)]
    out = tmp_path / "out"
    committed = write_objects(out, ids, per_shard=2)
    assert [c["shard"] for c in committed] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [c["count"] for c in committed] == [2, 2, 1]
    index = json.loads((out / "shard-000000.json").read_text())
    assert index["bytes"] == (out / "shard-000000.tar").stat().st_size
    assert [s["key"] for s in index["samples"]] == [sanitize_object_id(i) for i in ids[:2]]
    # members named <key>.<member>, contiguous per sample, deterministic header fields
    with tarfile.open(out / "shard-000000.tar") as tf:
        infos = tf.getmembers()
    assert all(i.mtime == infos[0].mtime and i.uid == 0 and i.uname == "" for i in infos)
    assert infos[0].name == f"{sanitize_object_id(ids[0])}.000.depth.npy"
    # the webdataset package reads it back, byte for byte
    ds = wds.WebDataset([str(p) for p in sorted(out.glob("shard-*.tar"))], shardshuffle=False)
    got = list(ds)
    assert [g["__key__"] for g in got] == [sanitize_object_id(i) for i in ids]
    want = make_members(ids[3])
    assert {k: got[3][k] for k in want} == want
    # our streaming reader decodes them
    decoded = list(iter_samples(sorted(str(p) for p in out.glob("shard-*.tar")), views=[0]))
    assert len(decoded) == 5 and decoded[0]["zero123"]["rgb"].shape == (1, 3, 12, 12)
    # reproducible bytes
    write_objects(tmp_path / "again", ids, per_shard=2)
    assert (out / "shard-000001.tar").read_bytes() == (tmp_path / "again" / "shard-000001.tar").read_bytes()


def test_failing_writer_leaves_nothing_visible(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="render crashed"), ShardWriter(str(out), 3, 0) as w:
        for i in range(2):
            w.add(sample_from_members(f"o{i}", make_members(f"o{i}")), "h", "train")
        raise RuntimeError("render crashed")
    assert list(out.iterdir()) == []  # no shard, no index, no temporary file
    assert committed_state(str(out))["next_index"] == 0
    # a full shard committed before the failure stays; the partial one vanishes
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(str(out), 2, 0) as w:
        for i in range(3):
            w.add(sample_from_members(f"o{i}", make_members(f"o{i}")), "h", "train")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    # a rejected sample does not corrupt the open shard
    with ShardWriter(str(out), 5, 1) as w:
        w.add(sample_from_members("p0", make_members("p0")), "h", "train")
        with pytest.raises(SampleError):
            w.add({"__key__": "p1", "x.png": "not bytes"}, "h", "train")
        with pytest.raises(SampleError):
            w.add({"__key__": "bad.key", "x.png": b""}, "h", "train")
    assert [s["__key__"] for s in iter_raw_samples([str(out / "shard-000001.tar")])] == ["p0"]


def test_committed_shards_are_immutable(tmp_path):
    out = tmp_path / "out"
    write_objects(out, ["a", "b"], per_shard=2)
    before = (out / "shard-000000.tar").read_bytes()
    with pytest.raises(ShardExistsError):
        write_objects(out, ["c"], per_shard=2, start=0)
    assert (out / "shard-000000.tar").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    # an orphan tar (no index) also blocks its name and is never counted
    (out / "shard-000001.tar").write_bytes(b"half-committed")
    with pytest.raises(ShardExistsError):
        write_objects(out, ["c"], per_shard=2, start=1)
    s = sample_from_members("d", make_members("d"))
    with pytest.raises(ValueError, match="already added"), ShardWriter(str(out), 2, 5) as w:
        w.add(s, "h")
        w.add(s, "h")


def test_split_is_stable_and_shards_are_single_split(tmp_path):
    ids = [f"object-{i}" for i in range(400)]
    splits = [split_for(i, 0.1) for i in ids]
    assert splits == [split_for(i, 0.1) for i in ids]  # deterministic
    assert 20 <= splits.count("val") <= 60
    assert split_for("x", 0.0) == "train" and split_for("x", 1.0) == "val"
    # adding objects never changes earlier ones (it depends on the id only)
    assert [split_for(i, 0.1) for i in ids[:50]] == splits[:50]
    assert split_for("object-7", 0.1) == splits[7]  # pinned by hash, not by position
    out = tmp_path / "out"
    some = [i for i, s in zip(ids, splits) if s == "val"][:2] + [i for i, s in zip(ids, splits) if s == "train"][:3]
    committed = write_objects(out, some, per_shard=2, val_fraction=0.1)
    for c in committed:
        assert {s["split"] for s in c["samples"]} == {c["split"]}
    assert sorted(c["count"] for c in committed if c["split"] == "train") == [1, 2]


# ------------------------------------------------------------------------------------------
# state, manifest, failures
# ------------------------------------------------------------------------------------------
def test_committed_state_after_crash_without_manifest(tmp_path):
    out = tmp_path / "out"
    write_objects(out, ["a", "b", "c"], per_shard=2)  # shards 0 (a,b) and 1 (c)
    (out / ".shard-000002.tar.tmp-deadbeef").write_bytes(b"partial")  # killed mid-shard
    (out / "shard-000003.tar").write_bytes(b"whole but no index")  # killed between tar and index
    state = committed_state(str(out))
    assert read_latest_manifest(str(out)) is None
    assert state["objects"] == {"a": "h-0", "b": "h-0", "c": "h-0"}
    assert state["next_index"] == 4 and state["orphans"] == ["shard-000003.tar"]
    # what the render stage makes of this state (only the missing or changed objects are rendered) is
    # tested through pipelines.render.run in tests/unit/test_render_stage.py; here: a re-render goes
    # into a new shard after the orphan, and the state follows it
    write_objects(out, ["b"], per_shard=2, start=state["next_index"], seed=1)
    state2 = committed_state(str(out))
    assert state2["objects"]["b"] == "h-1" and state2["location"]["b"] == "shard-000004.tar"


def test_manifest_versions_append(tmp_path):
    out = str(tmp_path / "out")
    write_objects(out, ["a", "b", "c"], per_shard=2)
    uri1 = write_manifest_version(out, settings_hash="cfg1", source_list_hash="src1", config={"res": 16},
                                  failures=[{"object_id": "z", "reason": "Bad glTF: json error\ntrace"}])
    m1 = read_latest_manifest(out)
    assert uri1.endswith("manifest/v000001.json") and m1["version"] == 1
    assert [s["name"] for s in m1["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert m1["counts"] == {"train": 3, "val": 0} and m1["num_objects"] == 3
    assert m1["failures"]["count"] == 1 and m1["failures"]["top_reasons"][0]["reason"] == "Bad glTF: json error"
    assert m1["shards"][0]["samples"][0] == {"key": "a", "content_hash": "h-0", "split": "train"}
    # a second run: b re-rendered, d new -> new shard; v2 lists old + new, b's old copy superseded
    write_objects(out, ["b", "d"], per_shard=2, start=committed_state(out)["next_index"], seed=1)
    write_manifest_version(out, settings_hash="cfg2", source_list_hash="src2")
    assert list_manifest_versions(out) == [1, 2]
    m2 = read_latest_manifest(out)
    assert read_manifest(out, 1) == m1  # old version untouched
    assert m2["previous_version"] == 1 and m2["new_shards"] == ["shard-000002.tar"]
    assert [s["name"] for s in m2["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert m2["shards"][0]["superseded"] == ["b"] and m2["shards"][0]["live"] == 1
    assert m2["counts"]["train"] == 4 and m2["num_objects"] == 4
    # readers see each object once, in its current version
    uris = shard_uris_from_manifest(out, "train")
    keys = [s["__key__"] for s in iter_raw_samples(uris, manifest_filter(m2, "train"))]
    assert sorted(keys) == ["a", "b", "c", "d"]
    assert shard_uris_from_manifest(out, "val") == []
    # a new version never replaces an old one
    assert write_manifest_version(out, settings_hash="cfg2", source_list_hash="src2").endswith("v000003.json")
    assert read_manifest(out, 2) == m2


def test_failures_table(tmp_path):
    out = str(tmp_path / "out")
    write_failures(out, 1, [{"object_id": "a/x.glb", "uri": "s3://b/a/x.glb", "reason": "Bad glTF", "seconds": 1.5},
                            {"object_id": "b", "reason": "timeout", "log_tail": "..."}])
    write_failures(out, f"{out}/manifest/v000002.json", [{"object_id": "a/x.glb", "reason": "missing texture",
                                                          "render_hash": "r1"}])
    rows = read_failures(out)
    assert [r["object_id"] for r in rows] == ["a/x.glb", "b"]
    assert rows[0]["reason"] == "missing texture" and rows[0]["version"] == 2 and rows[0]["render_hash"] == "r1"
    assert rows[0]["key"] == sanitize_object_id("a/x.glb") and rows[1]["log_tail"] == "..."
    assert all(r["time"] for r in rows)
    write_objects(out, ["b"])
    assert [r["object_id"] for r in read_failures(out, drop_committed=True)] == ["a/x.glb"]
    with pytest.raises(FileExistsError):
        write_failures(out, 2, [])


# ------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------
def test_shard_dataset_splits_readers(tmp_path):
    out = str(tmp_path / "out")
    ids = [f"o{i}" for i in range(6)]
    write_objects(out, ids, per_shard=2)  # 3 shards
    write_manifest_version(out, settings_hash="c", source_list_hash="s")
    for world in (2, 4):  # by shard (3 shards >= 2 readers) and by sample (3 < 4)
        seen = []
        for rank in range(world):
            ds = ShardDataset(output=out, split="train", rank=rank, world_size=world, decode=False)
            seen += [s["__key__"] for s in ds]
        assert sorted(seen) == ids
    ds = ShardDataset(output=out, rank=0, world_size=1, shuffle=True, shuffle_buffer=3, views="none",
                      with_depth=False, with_normals=False)
    ds.set_epoch(1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)))
    assert batch["cond_rgb"].shape == (3, 3, RES["cond"], RES["cond"])


@pytest.mark.s3
def test_s3_round_trip(s3_bucket):
    out = f"{s3_bucket}/shards"
    write_objects(out, ["a", "b", "c"], per_shard=2)
    write_manifest_version(out, settings_hash="c", source_list_hash="s")
    state = committed_state(out)
    assert state["objects"] == {"a": "h-0", "b": "h-0", "c": "h-0"} and state["next_index"] == 2
    uris = shard_uris_from_manifest(out, "train")
    assert uris == [f"{out}/shard-000000.tar", f"{out}/shard-000001.tar"]
    got = list(iter_samples(uris, views=["000", "006"]))
    assert [g["key"] for g in got] == ["a", "b", "c"] and got[0]["random"]["depth"].shape == (1, 1, 8, 8)
    with pytest.raises(ShardExistsError):
        write_objects(out, ["d"], start=0)
    import webdataset as wds

    register_s3_gopen()  # plain webdataset over s3:// through geco.storage
    assert [s["__key__"] for s in wds.WebDataset(uris, shardshuffle=False)] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------
# temporaries of killed writers (issue #10 item 10)
# ------------------------------------------------------------------------------------------
def _killed_mid_shard(out: str) -> None:
    """A child process opens a shard, writes one sample and dies without cleaning up."""
    pid = os.fork()
    if pid == 0:
        w = ShardWriter(out, 4, 0)
        w.add(sample_from_members("dead", make_members("dead")), "h", "train")
        w._open["train"]._file._f.flush()
        os._exit(0)  # killed: no close, no __del__
    os.waitpid(pid, 0)


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = str(tmp_path / "out")
    _killed_mid_shard(out)
    (dead,) = [p for p in Path(out).iterdir() if ".tmp-" in p.name]
    assert dead.name.startswith(".shard-000000.tar.tmp-") and dead.stat().st_size > 0
    live = ShardWriter(out, 4, 1)  # a concurrent writer in this (live) process
    live.add(sample_from_members("live", make_members("live")), "h", "train")
    (live_tmp,) = [p for p in Path(out).iterdir() if ".tmp-" in p.name and p != dead]
    other_host = Path(out) / ".shard-000007.tar.tmp-0123abcd-42@another-host.example"
    other_host.write_bytes(b"x")  # another host's writer, recently active
    unknown_old = Path(out) / ".shard-000008.tar.tmp-89abcdef"  # no pid/host in the name, old
    unknown_old.write_bytes(b"x")
    os.utime(unknown_old, (time.time() - 7200, time.time() - 7200))

    removed = clean_stale_temporaries(out, max_age_s=3600)
    assert removed == sorted([str(dead), str(unknown_old)])
    assert live_tmp.exists() and other_host.exists() and not dead.exists()
    live.close()  # the live writer loses nothing
    assert [s["key"] for s in committed_state(out)["shards"][0]["samples"]] == ["live"]
    assert clean_stale_temporaries(out, max_age_s=3600) == []
    assert clean_stale_temporaries(out, max_age_s=3600, now=time.time() + 7200) == [str(other_host)]


@pytest.mark.s3
def test_stale_incomplete_s3_uploads_are_aborted(s3_bucket):
    from geco import storage

    out = f"{s3_bucket}/shards"
    bucket, key = storage.split_s3(out)
    client = storage.s3_client()
    up = client.create_multipart_upload(Bucket=bucket, Key=f"{key}/shard-000000.tar")
    client.upload_part(Bucket=bucket, Key=f"{key}/shard-000000.tar", UploadId=up["UploadId"], PartNumber=1,
                       Body=b"x" * 1024)
    assert clean_stale_temporaries(out, max_age_s=3600) == []  # young: a writer may still be at it
    (removed,) = clean_stale_temporaries(out, max_age_s=3600, now=time.time() + 7200)
    assert removed.startswith(f"{out}/shard-000000.tar (incomplete upload")
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=f"{key}/").get("Uploads", []) == []
