"""The render stage end to end: real Blender renders through Ray Data actors into real WebDataset
shards, on local disk and on a real S3 server, tracked in MLflow (sqlite and a real server)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from geco import faults, storage
from geco.config import load_config
from geco.data import shards
from geco.data.loader import iter_dataset
from geco.data.procedural import make_procedural_glb, make_procedural_object
from tests.processes import wait_gone

pytestmark = [pytest.mark.blender, pytest.mark.slow]

_SQLITE: list[Path] = []  # one MLflow sqlite store for the module: its migrations cost ~7 s each


@pytest.fixture(scope="module", autouse=True)
def _shared_sqlite(tmp_path_factory):
    _SQLITE.append(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    yield
    _SQLITE.clear()


def tiny_config(tmp_path: Path, source_kind: str, source_uri: str, output: str, tracking_uri: str | None = None,
                *extra: str):
    overrides = [
        f"source.kind={source_kind}", f"source.uri={source_uri}", f"dataset.uri={output}",
        "render.cond.resolution=32", "render.zero123.resolution=32", "models.teacher.tile_size=32", "render.random.count=2",
        "render.random.resolution=32", "render.blender.samples=4", "render.blender.threads=1",
        "render.blender.timeout_s=60", "dataset.samples_per_shard=2", "dataset.val_fraction=0.0",
        "ray.num_renderers=1", "ray.cpus_per_renderer=0.5", "limits.max_failure_rate=0.9",
        f"cache.dir={tmp_path / 'cache'}", "cache.max_gb=1",
        f"tracking.uri={tracking_uri or 'sqlite:///' + str(_SQLITE[0])}",
        "tracking.experiment=test-render",
    ]
    return load_config(None, overrides + list(extra))


def write_bad_objects(folder: Path) -> dict[str, str]:
    """Each kind of broken input a user can hand us; returns {object id: expected reason fragment}."""
    (folder / "zero_byte.glb").write_bytes(b"")
    good = make_procedural_glb(0, 0, folder / "tmp-good")
    (folder / "truncated.glb").write_bytes(good.read_bytes()[:200])
    shutil.rmtree(folder / "tmp-good")
    (folder / "text_named_glb.glb").write_text("this is not a glTF file\n")
    (folder / "model.fbx").write_bytes(b"Kaydara FBX Binary  \x00")
    (folder / "no_faces.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    return {"zero_byte": "empty file (0 bytes)", "truncated": "Bad GLB: file size doesn't match",
            "text_named_glb": "Bad glTF: json error",
            "model": "unsupported extension .fbx", "no_faces": "mesh with no faces"}


def keys_in(dataset_uri: str) -> list[str]:
    return [s["key"] for s in iter_dataset(dataset_uri, None, views="none", with_depth=False, with_normals=False)]


def test_local_dir_render_records_failures_and_resumes(tmp_path, ray_local):
    from pipelines import render

    src = tmp_path / "objects"
    src.mkdir()
    make_procedural_glb(1, 0, src)                      # procedural-0001.glb
    make_procedural_object(2, 0, src / "textured")      # textured/procedural-0002.obj + .mtl + .png
    missing = make_procedural_object(3, 0, src / "missing_tex")
    (missing.parent / "procedural-0003.png").unlink()   # the .mtl now points at a missing texture
    bad = write_bad_objects(src)
    out = str(tmp_path / "shards")
    cfg = tiny_config(tmp_path, "dir", str(src), out)

    res = render.run(cfg)
    good = {"procedural-0001", "textured-procedural-0002", "missing_tex-procedural-0003"}
    assert res.rendered == 3, res.summary()
    assert res.failed == 4  # zero-byte, truncated, text, no faces (the .fbx is rejected before rendering)
    fails = {r["object_id"]: r for r in shards.read_failures(out)}
    assert len(fails) == len(bad)
    for stem, fragment in bad.items():  # ids of rejected files carry a hash suffix: match the stem
        (row,) = [r for oid, r in fails.items() if oid == stem or oid.startswith(stem + "_")]
        assert fragment.lower() in row["reason"].lower(), (stem, row["reason"])
    assert set(keys_in(out)) == good and len(keys_in(out)) == 3  # each object exactly once
    # Nothing half-written is visible; every tar has its index.
    names = [storage.basename(u) for u in storage.listdir(out)]
    assert not [n for n in names if ".tmp-" in n]
    assert {n[:-4] for n in names if n.endswith(".tar")} == {n[:-5] for n in names if n.startswith("shard-") and n.endswith(".json")}
    # The missing texture rendered and is flagged in the object's metadata.
    metas = {s["key"]: s["meta"] for s in iter_dataset(out, None, views="none")}
    flagged = json.dumps(metas["missing_tex-procedural-0003"]).lower()
    assert "missing" in flagged and "texture" in flagged

    # Re-run with the same config: nothing is rendered, failures are not retried, nothing is
    # re-versioned (the rejected .fbx is counted, not recorded again).
    again = render.run(cfg)
    assert (again.rendered, again.skipped, again.previously_failed) == (0, 3, 4), again.summary()
    assert again.rejected == 1 and (again.manifest_uri, again.failures_uri) == (None, None)

    # Add one object and change another: only those two render; each key stays unique.
    make_procedural_glb(4, 0, src)
    make_procedural_glb(5, 0, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "procedural-0005.glb", src / "procedural-0001.glb")
    inc = render.run(cfg)
    assert inc.rendered == 2 and inc.skipped == 2, inc.summary()
    keys = keys_in(out)
    assert sorted(keys) == sorted(good | {"procedural-0004"})
    assert len(shards.list_manifest_versions(out)) == 2  # the first run's, this one's (none for the re-run)

    # --force re-renders everything still present; readers still see each object once.
    forced = render.run(cfg, force=True)
    assert forced.rendered == 4
    assert sorted(keys_in(out)) == sorted(good | {"procedural-0004"})


def test_s3_render_with_mlflow_server_and_ray_data_reader(tmp_path, ray_local, s3_bucket, mlflow_server):
    import mlflow

    from pipelines import render
    from pipelines.data import read_shards

    local = tmp_path / "objects"
    for i in range(3):
        make_procedural_glb(i, 0, local)
    for p in sorted(local.iterdir()):
        storage.upload(p, storage.join(s3_bucket, "objects", p.name))
    out = storage.join(s3_bucket, "shards")
    cfg = tiny_config(tmp_path, "dir", storage.join(s3_bucket, "objects"), out, mlflow_server.uri)

    res = render.run(cfg)
    assert res.rendered == 3 and res.failed == 0, res.summary()
    assert all(u.startswith("s3://") for u in res.new_shards)

    samples = list(iter_dataset(out, None))
    assert sorted(s["key"] for s in samples) == ["procedural-0000", "procedural-0001", "procedural-0002"]
    s = samples[0]
    assert tuple(s["cond_rgb"].shape) == (3, 32, 32)
    assert tuple(s["zero123"]["rgb"].shape) == (6, 3, 32, 32)
    assert tuple(s["random"]["rgb"].shape) == (2, 3, 32, 32)
    assert float(s["cond_alpha"].max()) > 0.5 and float(s["cond_alpha"].min()) < 0.5

    rows = read_shards(out, split="train").take_all()
    assert sorted(r["__key__"] for r in rows) == ["procedural-0000", "procedural-0001", "procedural-0002"]
    assert all(isinstance(r["cond.png"], bytes) for r in rows)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.data.metrics["rendered"] == 3
    assert run.data.params["source.kind"] == "dir"
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"contact_sheet.png", "manifest.json"} <= artifacts


def test_relative_source_renders_and_a_run_with_no_success_fails(tmp_path, ray_local, monkeypatch):
    """Issue #10 item 1: a relative --source used to fail every object in the actors (another
    working directory), and "0 rendered, 2 failed" was a success."""
    from pipelines import render

    make_procedural_glb(0, 0, tmp_path / "objs")
    make_procedural_glb(1, 0, tmp_path / "objs")
    (tmp_path / "broken").mkdir()
    for name in ("zero_byte.glb", "text.glb"):
        (tmp_path / "broken" / name).write_bytes(b"" if name == "zero_byte.glb" else b"not a glTF file\n")
    monkeypatch.chdir(tmp_path)
    res = render.run(tiny_config(tmp_path, "auto", "objs", str(tmp_path / "out")))
    assert (res.rendered, res.failed) == (2, 0), res.summary()
    assert f"source: dir (detected from the URI; set source.kind to choose) {tmp_path / 'objs'}" in res.summary()

    out = str(tmp_path / "out-broken")
    with pytest.raises(render.RenderAborted, match="none of the 2 objects .*2 failed now"):
        render.run(tiny_config(tmp_path, "dir", "broken", out))
    fails = shards.read_failures(out)
    assert len(fails) == 2 and not any(f["retryable"] for f in fails)  # the objects' fault: not retried
    with pytest.raises(render.RenderAborted, match="2 failed before"):
        render.run(tiny_config(tmp_path, "dir", "broken", out))


def test_hang_times_out_and_killed_actor_is_restarted(tmp_path, ray_local, monkeypatch):
    from pipelines import render

    """A hung Blender is killed at the timeout; an actor that dies politely (closing its Blender) and
    one SIGKILLed mid-render with no clean-up at all are restarted and their objects retried: each
    object rendered exactly once, and the orphaned Blender child does not outlive its actor."""
    marker, sigkilled = tmp_path / "actor-killed", tmp_path / "actor-sigkilled"
    monkeypatch.setenv(faults.ENV, f"hang:procedural-0001,kill-actor:procedural-0002:{marker},"
                                   f"sigkill-actor:procedural-0003:{sigkilled}")
    out = str(tmp_path / "shards")
    cfg = tiny_config(tmp_path, "procedural", "", out, None, "source.num_procedural=4",
                      "render.blender.timeout_s=8")
    res = render.run(cfg)
    assert marker.exists(), "the fault was not injected: the actor never died"
    assert res.rendered == 3 and res.failed == 1, res.summary()
    (fail,) = shards.read_failures(out)
    assert fail["object_id"] == "procedural-0001" and "timed out" in fail["reason"]
    assert sorted(keys_in(out)) == ["procedural-0000", "procedural-0002", "procedural-0003"]  # once each

    # the SIGKILLed actor's Blender (rendering procedural-0003 then) noticed and left
    orphan = int(re.search(r"blender (\d+)", sigkilled.read_text()).group(1))
    assert not wait_gone([orphan], timeout=10), f"Blender {orphan} outlived its SIGKILLed actor"


def test_mostly_failing_job_aborts_and_keeps_what_it_committed(tmp_path, ray_local):
    from pipelines import render

    src = tmp_path / "objects"
    src.mkdir()
    make_procedural_glb(0, 0, src)
    for i in range(4):
        (src / f"broken{i}.glb").write_bytes(b"not a glb")
    out = str(tmp_path / "shards")
    cfg = tiny_config(tmp_path, "dir", str(src), out, None, "limits.max_failure_rate=0.5", "limits.min_attempts=3")
    with pytest.raises(render.RenderAborted, match="broken install"):
        render.run(cfg)
    assert len(shards.read_failures(out)) >= 3
    assert shards.read_latest_manifest(out) is not None


def test_unreachable_s3_output_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from cli.main import main
    from tests.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._client.cache_clear()
    try:
        rc = main(["render", "--output", "s3://bucket/shards", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    finally:
        storage._client.cache_clear()
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot reach S3 endpoint" in err and "AWS_ENDPOINT_URL" in err
    assert not (tmp_path / "m.db").exists()  # failed before any work, even before tracking


def test_objaverse_uids_render_with_licences_and_filter(tmp_path, ray_local):
    """Objaverse UIDs resolve through the objaverse package's on-disk cache layout (no network
    here); licences land in meta.json and `exclude_licenses` drops non-commercial objects."""
    from pipelines import render
    from tests.fake_objaverse import write_fake_objaverse_cache

    glb = [make_procedural_glb(i, 0, tmp_path / "glbs").read_bytes() for i in range(3)]
    uids = ["a" * 32, "b" * 32, "c" * 32]
    licences = ["by", "by-nc", "cc0"]
    base = tmp_path / "objaverse"
    write_fake_objaverse_cache(base, {u: (g, {"license": lic, "name": f"obj {u[0]}"})
                                      for u, g, lic in zip(uids, glb, licences)})
    uid_list = tmp_path / "uids.txt"
    uid_list.write_text("# LVIS subset\n" + "\n".join(uids) + "\n")
    out = str(tmp_path / "shards")
    cfg = tiny_config(tmp_path, "objaverse", str(uid_list), out, None, f"source.objaverse_cache={base}",
                      "source.exclude_licenses=[by-nc]")
    res = render.run(cfg)
    assert (res.rendered, res.failed, res.excluded) == (2, 0, 1), res.summary()
    metas = {s["key"]: s["meta"] for s in iter_dataset(out, None, views="none")}
    assert sorted(metas) == sorted([uids[0], uids[2]])
    assert metas[uids[0]]["license"] == "by" and metas[uids[2]]["license"] == "cc0"
