"""The render stage's decisions that need no renderer (issue #10 items 1 and 3): what is retried,
when a run is a failure, and when a new manifest/failures version is written. Tracking is off and
nothing is left to render, so neither MLflow nor Ray nor Blender starts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from geco.config import load_config
from geco.data import shards
from geco.data.procedural import make_procedural_glb
from geco.sources import ObjectRef, SourceError, list_objects
from pipelines import render


def config(source: Path | str, out: Path, *extra: str):
    return load_config(None, [f"source.uri={source}", f"dataset.uri={out}", "tracking.enabled=false", *extra])


def commit(out: Path, cfg, object_ids: list[str]) -> None:
    """Pretend these objects were rendered with ``cfg`` (a committed shard with their render hash)."""
    refs = {r.object_id: r for r in list_objects(cfg.source).objects}
    with shards.ShardWriter(str(out), 8, shards.committed_state(str(out))["next_index"]) as w:
        for oid in object_ids:
            w.add({"__key__": oid, "meta.json": b"{}"}, render.render_hash(refs[oid], cfg.render))


def versions(out: Path) -> tuple[list[int], list[str]]:
    return shards.list_manifest_versions(str(out)), sorted(p.name for p in (out / "failures").glob("*.jsonl"))


def test_environment_failures_are_retried_object_failures_are_not():
    refs = [ObjectRef(k, f"/objs/{k}.glb", content_hash=k) for k in ("env", "obj", "old", "done")]
    hashes = {r.object_id: f"h-{r.object_id}" for r in refs}
    prev = {"env": {"render_hash": "h-env", "reason": "fetch failed: FileNotFoundError: x", "retryable": True},
            "obj": {"render_hash": "h-obj", "reason": "Bad glTF: json error", "retryable": False},
            "old": {"render_hash": "h-old", "reason": "fetch failed: FileNotFoundError: objs/old.glb"}}  # no flag yet
    todo, skipped, failed_before = render.plan(refs, hashes, {"done": "h-done"}, prev)
    assert ([r.object_id for r in todo], skipped, failed_before) == (["env", "old"], 1, 1)
    todo, _, failed_before = render.plan(refs, hashes, {"done": "h-done"}, prev, retry_failed=True)
    assert [r.object_id for r in todo] == ["env", "obj", "old"] and failed_before == 0


def test_a_run_where_every_object_failed_before_is_not_a_success(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "out"
    for i in range(2):
        make_procedural_glb(i, 0, src)
    cfg = config(src, out, "source.kind=dir")
    refs = list_objects(cfg.source).objects
    man = shards.write_manifest_version(str(out), settings_hash="s", source_list_hash="l")
    shards.write_failures(str(out), man, [{"object_id": r.object_id, "uri": r.uri, "reason": "Bad glTF",
                                           "render_hash": render.render_hash(r, cfg.render)} for r in refs])
    with pytest.raises(render.RenderAborted, match="none of the 2 objects .* 2 failed before") as err:
        render.run(cfg)  # below limits.min_attempts, and nothing attempted at all
    assert "\n" not in str(err.value)


def test_rejected_files_are_counted_and_recorded_once(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "out"
    make_procedural_glb(0, 0, src)
    (src / "chair.fbx").write_bytes(b"Kaydara FBX Binary  \x00")
    cfg = config(src, out, "source.kind=dir")
    commit(out, cfg, ["procedural-0000"])

    first = render.run(cfg)
    assert (first.skipped, first.rejected, first.failed) == (1, 1, 0)
    assert "1 rejected by the source" in first.summary() and f"source: dir (source.kind) {src}" in first.summary()
    assert versions(out) == ([1], ["v000001.jsonl"])
    again = render.run(cfg)  # nothing changed: no new manifest, no new failures version
    assert again.rejected == 1 and (again.manifest_uri, again.failures_uri) == (None, None)
    assert versions(out) == ([1], ["v000001.jsonl"])
    (src / "table.dae").write_bytes(b"<COLLADA/>")  # a new rejected file: recorded (only it)
    third = render.run(cfg)
    assert third.rejected == 2 and versions(out) == ([1, 2], ["v000001.jsonl", "v000002.jsonl"])
    rows = [json.loads(line) for line in (out / "failures/v000002.jsonl").read_text().splitlines()]
    assert [r["uri"] for r in rows] == [str(src / "table.dae")]


def test_only_rejected_files_is_a_failed_run(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "out"
    src.mkdir()
    for name in ("a.fbx", "b.dae", "c.3ds"):
        (src / name).write_bytes(b"x")
    for _ in range(2):
        with pytest.raises(render.RenderAborted, match="none of the 3 objects .* 3 rejected by the source"):
            render.run(config(src, out, "source.kind=dir"))
    assert versions(out) == ([1], ["v000001.jsonl"])  # recorded once


def test_an_empty_source_is_an_error(tmp_path):
    src, out = tmp_path / "objs", tmp_path / "out"
    src.mkdir()
    (src / "README.md").write_text("nothing to render here")
    with pytest.raises(SourceError, match="the source has no objects"):
        render.run(config(src, out, "source.kind=dir"))
    assert versions(out) == ([], [])


def test_cli_exit_2_for_an_empty_source_and_a_wrong_kind(tmp_path):
    src = tmp_path / "objs"
    src.mkdir()
    cases = [[], ["--set", "source.kind=procedural"]]
    for extra in cases:
        p = subprocess.run([sys.executable, "-m", "cli", "render", "--source", "objs", "--output", "out",
                            "--set", "tracking.enabled=false", *extra], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("geco:")]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert ("no objects" if not extra else "set source.kind=auto") in lines[0]


class FakeRenderers:
    """Ray Data and the Blender actors replaced by a stand-in that "renders" each object into
    synthetic members at once (``tests.unit.test_shards.make_members``): everything the driver
    decides and commits is real. ``asked`` records the object ids of each run that had work;
    ``fail`` holds ids that fail as broken objects; ``crash_after`` kills the run (an exception out
    of the row stream, as a dying driver's would end it) after that many rows."""

    def __init__(self, monkeypatch):
        import ray.data

        self.asked: list[list[str]] = []
        self.fail: set[str] = set()
        self.crash_after: int | None = None
        monkeypatch.setattr(ray.data, "from_items", self.from_items)
        monkeypatch.setattr(render, "init_ray", lambda *a, **k: None)

    def from_items(self, items, **_):
        self.asked.append([ObjectRef.from_json(i["ref"]).object_id for i in items])
        return self

    def map_batches(self, *_, **__):
        return self

    def iter_rows(self):
        from tests.unit.test_shards import make_members

        for n, oid in enumerate(self.asked[-1]):
            if self.crash_after is not None and n == self.crash_after:
                self.crash_after = None
                raise KeyboardInterrupt("the driver died")
            ok = oid not in self.fail
            yield {"object_id": oid, "uri": "", "ok": ok, "reason": "" if ok else "Bad glTF: json error",
                   "log_tail": "", "seconds": 0.1, "retryable": False,
                   "sample": render.pack_members(make_members(oid)) if ok else b"", "meta": "{}"}


def live_keys(out: Path) -> list[str]:
    """Each object id as often as readers see it (the latest manifest's live samples)."""
    man = shards.read_latest_manifest(str(out))
    return sorted(k for s in man["shards"] for k in (x["key"] for x in s["samples"]) if k not in s.get("superseded", []))


def test_a_rerun_after_a_crash_renders_only_what_is_missing_and_retry_failed_retries(tmp_path, monkeypatch):
    src, out = tmp_path / "objs", tmp_path / "out"
    ids = [f"procedural-000{i}" for i in range(5)]
    for i in range(5):
        make_procedural_glb(i, 0, src)
    cfg = config(src, out, "source.kind=dir", "dataset.samples_per_shard=2")
    fake = FakeRenderers(monkeypatch)
    fake.fail = {ids[4]}
    fake.crash_after = 3  # the first shard (2 objects) is committed, the third object is lost mid-shard
    with pytest.raises(KeyboardInterrupt):
        render.run(cfg)
    assert sorted(shards.committed_state(str(out))["objects"]) == ids[:2]

    again = render.run(cfg)  # only what the crashed run did not commit
    assert fake.asked[-1] == ids[2:] and (again.rendered, again.skipped, again.failed) == (2, 2, 1), again.summary()
    assert live_keys(out) == ids[:4]

    n = len(fake.asked)
    same = render.run(cfg)  # nothing missing: nothing is asked for, the broken object is not retried
    assert len(fake.asked) == n and (same.rendered, same.skipped, same.previously_failed) == (0, 4, 1)

    fake.fail = set()
    retried = render.run(cfg, retry_failed=True)  # --retry-failed: only the failed object
    assert fake.asked[-1] == [ids[4]] and (retried.rendered, retried.skipped) == (1, 4), retried.summary()
    assert live_keys(out) == ids


def test_a_render_settings_change_re_renders_and_a_timeout_change_does_not(tmp_path, monkeypatch):
    src, out = tmp_path / "objs", tmp_path / "out"
    ids = [f"procedural-000{i}" for i in range(3)]
    for i in range(3):
        make_procedural_glb(i, 0, src)
    fake = FakeRenderers(monkeypatch)
    cfg = config(src, out, "source.kind=dir")
    assert render.run(cfg).rendered == 3 and fake.asked == [ids]
    render.run(config(src, out, "source.kind=dir", "render.blender.timeout_s=999", "render.blender.threads=1"))
    assert fake.asked == [ids]  # not a pixel setting: nothing re-rendered
    for change in ("render.blender.samples=7", "render.random.count=3", "render.cond.resolution=640"):
        res = render.run(config(src, out, "source.kind=dir", change))
        assert fake.asked[-1] == ids and res.rendered == 3, (change, res.summary())
        assert live_keys(out) == ids  # the new renders supersede the old ones: each object once


def test_a_rerun_with_nothing_to_do_opens_no_mlflow_run(tmp_path):
    """Issue #10 item 11: a no-op re-run says "nothing to do" and creates no MLflow run."""
    import mlflow

    src, out, db = tmp_path / "objs", tmp_path / "out", tmp_path / "mlruns.db"
    make_procedural_glb(0, 0, src)
    cfg = config(src, out, "source.kind=dir", "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                 "tracking.experiment=noop", "name=noop")
    commit(out, cfg, ["procedural-0000"])
    first = render.run(cfg)  # nothing to render, but no manifest yet: a version is written, and tracked
    assert first.manifest_uri and first.mlflow_run_id and not first.nothing_to_do
    again = render.run(cfg)
    assert again.nothing_to_do and again.mlflow_run_id is None and (again.manifest_uri, again.failures_uri) == (None, None)
    assert again.summary().startswith("render: nothing to do; 0 rendered, 1 skipped (already done)")
    assert versions(out) == ([1], [])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("noop")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [first.mlflow_run_id]
