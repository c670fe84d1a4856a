"""pipelines.retrain.source_changes: the source listing against the latest manifest's render hashes
(added, changed, unchanged, removed; changed render settings), with no renderer: committed shards are
written directly with the render hashes the render stage would record. Then the parts of a retraining
run that need no Ray, no Blender and no registry: its key, its config, its lease, its exit status."""
from __future__ import annotations

from pathlib import Path

import pytest

from geco.config import ConfigError, load_config
from geco.data import shards
from geco.data.procedural import make_procedural_glb
from geco.lease import Lease, lease_uri
from geco.sources import list_objects
from pipelines import render
from pipelines.retrain import KEPT, RetrainError, RetrainOutputs, retrain_config, retrain_key, run, source_changes


def config(src: Path, out: Path, *extra: str):
    return load_config(None, [f"source.uri={src}", "source.kind=dir", f"dataset.uri={out}", "tracking.enabled=false",
                              *extra])


def commit_version(out: Path, cfg, object_ids: list[str]) -> None:
    """As if render had rendered these objects with ``cfg`` and written a manifest version."""
    refs = {r.object_id: r for r in list_objects(cfg.source).objects}
    with shards.ShardWriter(str(out), 8, shards.committed_state(str(out))["next_index"]) as w:
        for oid in object_ids:
            w.add({"__key__": oid, "meta.json": b"{}"}, render.render_hash(refs[oid], cfg.render))
    shards.write_manifest_version(str(out), settings_hash=cfg.render.settings_hash(), source_list_hash="x")


def ids(refs) -> list[str]:
    return sorted(r.object_id for r in refs)


def test_two_added_objects_are_the_only_ones_to_render(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "shards"
    for i in range(3):
        make_procedural_glb(i, 0, src)
    cfg = config(src, out)
    first = source_changes(cfg)
    assert first.manifest_version is None and ids(first.added) == ids(first.todo) and len(first.todo) == 3
    commit_version(out, cfg, [r.object_id for r in first.todo])

    nothing = source_changes(cfg)
    assert (nothing.manifest_version, nothing.any, len(nothing.unchanged)) == (1, False, 3)

    make_procedural_glb(3, 0, src)
    make_procedural_glb(4, 0, src)
    grown = source_changes(cfg)
    assert ids(grown.added) == ids(grown.todo) == ["procedural-0003", "procedural-0004"]
    assert grown.changed == [] and len(grown.unchanged) == 3 and not grown.settings_changed
    assert "2 added, 0 changed, 3 unchanged, 0 removed (kept); 2 to render" in grown.summary()


def test_changed_and_removed_objects_and_changed_settings(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "shards"
    paths = [make_procedural_glb(i, 0, src) for i in range(3)]
    cfg = config(src, out)
    commit_version(out, cfg, [f"procedural-{i:04d}" for i in range(3)])

    Path(paths[0]).unlink()  # removed: stays in the dataset, reported
    changed = Path(paths[1])
    changed.write_bytes(changed.read_bytes() + b" ")  # new bytes: a new content hash
    ch = source_changes(cfg)
    assert ch.removed == ["procedural-0000"] and ids(ch.changed) == ids(ch.todo) == ["procedural-0001"]
    assert ch.unchanged == ["procedural-0002"] and ch.added == []

    other = config(src, out, "render.blender.samples=7")  # pixels change: everything renders again
    re = source_changes(other)
    assert re.settings_changed and ids(re.todo) == ["procedural-0001", "procedural-0002"]
    assert "render settings changed" in re.summary()
    timeout_only = source_changes(config(src, out, "render.blender.timeout_s=999"))
    assert not timeout_only.settings_changed and ids(timeout_only.todo) == ["procedural-0001"]


def test_objects_that_failed_before_are_not_planned_again(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "shards"
    for i in range(2):
        make_procedural_glb(i, 0, src)
    cfg = config(src, out)
    commit_version(out, cfg, ["procedural-0000"])
    ref = next(r for r in list_objects(cfg.source).objects if r.object_id == "procedural-0001")
    shards.write_failures(str(out), 1, [{"object_id": ref.object_id, "reason": "Bad glTF",
                                         "render_hash": render.render_hash(ref, cfg.render), "retryable": False}])
    ch = source_changes(cfg)
    assert ids(ch.added) == ["procedural-0001"] and ch.todo == [] and ch.previously_failed == 1


# ---------------------------------------------------------------------------------------------
# the pure parts of a retraining run (the run itself: tests/integration/test_retrain.py)
# ---------------------------------------------------------------------------------------------
def test_the_retrain_key_names_the_start_and_the_source():
    hashes = {"a": "1", "b": "2"}
    key = retrain_key("3", hashes)
    assert key.startswith("from-v3-") and key == retrain_key("3", dict(reversed(hashes.items())))  # order-free
    assert len({key, retrain_key("4", hashes), retrain_key("3", {**hashes, "c": "3"}),
                retrain_key("3", {"a": "1", "b": "changed"})}) == 4


def test_a_retraining_trains_from_production_into_its_own_folder(tmp_path):
    cfg = config(tmp_path / "objs", tmp_path / "shards", f"retrain.output_uri={tmp_path / 'retrain'}")
    run_cfg = retrain_config(cfg, "from-v3-abc", "/cache/bundle/generator")
    root = tmp_path / "retrain" / "from-v3-abc"
    assert run_cfg.models.generator.pretrained == "/cache/bundle/generator"
    assert (run_cfg.stage1.output_uri, run_cfg.stage2.output_uri, run_cfg.evaluate.output_uri) == (
        str(root / "stage1"), str(root / "stage2"), str(root / "evaluate"))
    assert run_cfg.stage1.train.storage_path == run_cfg.stage2.train.storage_path == str(root / "train")
    # everything else is the config's: the same dataset, pseudo-GT (incremental) and registry
    assert (run_cfg.dataset, run_cfg.pseudo_gt, run_cfg.registry) == (cfg.dataset, cfg.pseudo_gt, cfg.registry)


def test_retrain_stages_must_train_the_generator():
    with pytest.raises(ConfigError, match="must include stage1"):
        load_config(None, ["retrain.stages=[render,evaluate]"])
    with pytest.raises(ConfigError, match="retrain.stages"):
        load_config(None, ["retrain.stages=[render,pretrain,stage1]"])


def test_a_held_lease_skips_the_run_cleanly(tmp_path):
    out = tmp_path / "shards"
    cfg = config(tmp_path / "objs", out, "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    with Lease(lease_uri(str(out), "retrain"), holder="cron@elsewhere pid 9"):
        result = run(cfg)
    assert result.exit_status == 0 and not result.did_work and result.dag is None
    assert "held by cron@elsewhere pid 9 until" in result.summary()
    assert not (tmp_path / "m.db").exists()  # it stopped before touching the registry


def test_retraining_needs_the_registry(tmp_path):
    with pytest.raises(RetrainError, match="tracking.enabled is false"):
        run(config(tmp_path / "objs", tmp_path / "shards"))


def test_the_exit_status_says_whether_production_moved():
    assert RetrainOutputs(promoted=True).exit_status == 0
    assert RetrainOutputs(promoted=None, did_work=False).exit_status == 0
    kept = RetrainOutputs(promoted=False, production_version="2", model_uri="models:/geco/3", dag=object(),
                          why="regressed beyond registry.tolerance=0.02 against production version 2: psnr")
    assert kept.exit_status == KEPT == 3
    assert "production stays (regressed beyond" in kept.summary() and "exit status 3" in kept.summary()
