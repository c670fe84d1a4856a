"""The pseudo_gt stage end to end on a local Ray and a real MLflow server, over render-shaped shards
written without Blender (tests/fake_renders.py):

* the first run computes every object, skips a broken sample (named in the failures table), writes
  shards + a manifest that decode_sample reads, and logs a `<name>/pseudo_gt` run with counts and
  a contact sheet;
* a re-run computes nothing, writes no new version and opens no MLflow run ("nothing to do");
* a re-rendered object is recomputed alone; a changed teacher recomputes everything.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from geco.config import load_config
from geco.data import shards
from geco.data.loader import iter_dataset
from geco.data.schema import decode_sample
from tests.fake_renders import write_render_shards

TINY = ["models.teacher.tile_size=16", "models.teacher.cond_size=32", "models.reconstructor.input_size=16",
        "models.reconstructor.lgm.down_channels=[8,16,32]", "models.reconstructor.lgm.down_attention=[false,false,true]",
        "models.reconstructor.lgm.up_channels=[32,16]", "models.reconstructor.lgm.up_attention=[true,false]",
        "models.reconstructor.lgm.num_heads=2", "models.reconstructor.lgm.norm_groups=4",
        "models.reconstructor.lgm.layers_per_block=1", "pseudo_gt.steps=3", "pseudo_gt.num_views=8",
        "pseudo_gt.resolution=24", "pseudo_gt.batch_size=2", "pseudo_gt.cpus_per_actor=0.5",
        "pseudo_gt.torch_threads=1", "dataset.samples_per_shard=2"]
KEYS = ["obj-a", "obj-b", "obj-c"]

pytestmark = pytest.mark.slow  # four stage runs, three of them start an actor pool (~40 s of CPU)


def runs_named(client, name: str):
    exp = client.get_experiment_by_name("test-pgt")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def save_tiny_teacher(cfg, dest: Path, seed: int) -> str:
    from geco.models.teacher import build_tiny_teacher, save_teacher

    return save_teacher(build_tiny_teacher(cfg.models.teacher, seed=seed), str(dest))


def test_pseudo_gt_is_incremental_and_tracked(tmp_path, ray_local, mlflow_server):
    import mlflow

    from pipelines import pseudo_gt

    renders, out = tmp_path / "renders", tmp_path / "pgt"
    write_render_shards(renders, KEYS + ["obj-broken"], broken=("obj-broken",))
    cfg = load_config(None, TINY + [f"dataset.uri={renders}", f"pseudo_gt.output_uri={out}",
                                    f"pretrain.output_uri={tmp_path / 'none'}", f"tracking.uri={mlflow_server.uri}",
                                    "tracking.experiment=test-pgt", "name=pgt-test"])
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    teacher_a = save_tiny_teacher(cfg, tmp_path / "teacher-a", seed=0)
    inputs = pseudo_gt.default_inputs(cfg, teacher=teacher_a)
    assert inputs.teacher_uri == teacher_a and inputs.reconstructor_uri == ""

    first = pseudo_gt.run(cfg, inputs)
    print(first.summary())
    assert (first.computed, first.failed, first.skipped, first.did_work) == (3, 1, 0, True)
    assert first.pseudo_gt_uri == str(out) and len(first.new_shards) == 2
    failures = shards.read_failures(str(out))
    assert [f["object_id"] for f in failures] == ["obj-broken"] and "'obj-broken'" in failures[0]["reason"]
    assert failures[0]["uri"].startswith(str(renders / "shard-"))
    manifest = shards.read_latest_manifest(str(out))
    assert manifest["version"] == 1 and manifest["num_objects"] == 3 and manifest["stage"] == "pseudo_gt"
    rows = {r["__key__"]: r for r in iter_dataset(str(out), None, decode=False)}
    sources = {r["__key__"]: r for r in iter_dataset(str(renders), None, decode=False)}
    assert sorted(rows) == KEYS
    for key, row in rows.items():
        d = decode_sample(row, with_normals=False)
        assert len(d["zero123"]["names"]) == 6 and len(d["random"]["names"]) == 2
        assert d["zero123"]["rgb"].shape[-1] == 24
        assert row["cond.png"] == sources[key]["cond.png"]
        meta = d["meta"]
        assert meta["source_hash"] == f"{key}-v1" and meta["teacher_hash"] == first.hashes["teacher"]
        assert {"reconstructor_hash", "settings_hash", "pseudo_gt_hash"} <= set(meta)
        assert {"noise.npy", "teacher.png", "gaussians.ply"} <= set(row)

    run = client.get_run(first.mlflow_run_id)
    assert run.info.run_name == "pgt-test/pseudo_gt" and run.data.tags["geco.stage"] == "pseudo_gt"
    assert run.data.metrics["computed"] == 3 and run.data.metrics["failed"] == 1
    assert run.data.metrics["seconds_per_object"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "failures.json"} <= artifacts

    # a re-run: nothing to do, no new version, no MLflow run
    again = pseudo_gt.run(cfg, inputs)
    assert (again.computed, again.failed, again.skipped, again.previously_failed) == (0, 0, 3, 1)
    assert not again.did_work and again.mlflow_run_id is None
    assert again.summary().startswith("pseudo_gt: nothing to do; 0 computed, 3 skipped")
    assert shards.list_manifest_versions(str(out)) == [1] and len(runs_named(client, "pgt-test/pseudo_gt")) == 1

    # obj-b re-rendered: only it is recomputed (the broken one failed before with the same hash)
    write_render_shards(renders, ["obj-b"], tag="v2")
    third = pseudo_gt.run(cfg, inputs)
    assert (third.computed, third.skipped, third.previously_failed) == (1, 2, 1), third.summary()
    assert shards.committed_state(str(out))["location"]["obj-b"] == "shard-000002.tar"

    # another teacher: everything is recomputed (the broken sample is tried again, and fails again)
    teacher_b = save_tiny_teacher(cfg, tmp_path / "teacher-b", seed=1)
    fourth = pseudo_gt.run(cfg, pseudo_gt.default_inputs(cfg, teacher=teacher_b))
    assert (fourth.computed, fourth.failed, fourth.skipped) == (3, 1, 0), fourth.summary()
    assert fourth.hashes["teacher"] != first.hashes["teacher"]
    assert fourth.hashes["reconstructor"] == first.hashes["reconstructor"]
    state = shards.committed_state(str(out))
    metas = {k: json.loads(r["meta.json"]) for k, r in
             ((r["__key__"], r) for r in iter_dataset(str(out), None, decode=False))}
    assert {m["teacher_hash"] for m in metas.values()} == {fourth.hashes["teacher"]}
    assert sorted(state["objects"]) == KEYS and shards.list_manifest_versions(str(out)) == [1, 2, 3]
    assert len(runs_named(client, "pgt-test/pseudo_gt")) == 3
