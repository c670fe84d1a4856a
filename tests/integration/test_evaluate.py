"""The evaluate stage end to end on GSO-layout objects made here (one texture where GSO keeps it, one
beside the mesh): ground truth rendered by real Blender through the render stage's actors, three
models under test (a tiny random bundle as stage1, its teacher with 2 steps and with 1), the results
folder of CONTRACTS.md, the MLflow run (metrics, lineage tags, artifacts), leakage marked, a re-run
doing nothing, and `geco evaluate` with bad input: one line, exit 2, the earlier results kept."""
from __future__ import annotations

import csv
import json

import pytest

from geco.config import load_config
from geco.data.procedural import make_gso_object
from geco.models.bundle import init_tiny_bundle
from tests.integration.test_cli_errors import geco

pytestmark = [pytest.mark.blender, pytest.mark.slow]

TINY_EVAL = ["evaluate.resolution=32", "evaluate.input_resolution=32", "evaluate.geometry_resolution=32",
             "evaluate.orbit_views=4", "evaluate.geometry_views=8", "evaluate.teacher_steps=2",
             "evaluate.turntable_frames=4", "evaluate.turntable_size=32", "evaluate.num_cpus=0.5",
             "render.blender.samples=4", "render.blender.threads=1", "ray.num_renderers=2", "ray.cpus_per_renderer=0.5"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, ray_local):
    from pipelines import evaluate
    from pipelines.stage import EvaluateInputs

    root = tmp_path_factory.mktemp("evaluate")
    gso = root / "gso"
    make_gso_object(1000, 0, gso, "teapot")
    make_gso_object(1002, 0, gso, "chicken", texture_beside=True)
    bundle = init_tiny_bundle(root / "bundle", include_teacher_unet=True)
    # a training manifest that holds an object named like one of the evaluation's (GSO's real folder name)
    (root / "shards" / "manifest").mkdir(parents=True)
    (root / "shards" / "manifest" / "v000001.json").write_text(json.dumps(
        {"version": 1, "settings_hash": "s0", "shards": [{"name": "shard-000000.tar", "samples": [
            {"key": "gso-CHICKEN", "content_hash": "0" * 24}, {"key": "procedural-0001", "content_hash": "1" * 24}]}]}))
    cfg = load_config(None, TINY_EVAL + [f"evaluate.gso_uri={gso}", f"evaluate.output_uri={root / 'out'}",
                                         f"cache.dir={root / 'cache'}", f"tracking.uri=sqlite:///{root / 'mlruns.db'}",
                                         "tracking.experiment=eval-test"])
    inputs = EvaluateInputs({"stage1": bundle, "teacher": bundle, "teacher_1step": bundle}, str(root / "shards"))
    first = evaluate.run(cfg, inputs)
    second = evaluate.run(cfg, inputs)
    return root, cfg, first, second


def test_results_folder(evaluation):
    root, _, out, _ = evaluation
    res = root / "out" / "results"
    assert out.did_work and out.uris["results"] == str(res)
    s = json.loads((res / "summary.json").read_text())
    assert s["objects"] == ["chicken", "teapot"] and s["models"] == ["teacher", "teacher_1step", "stage1"]
    assert s["view_sets"] == ["zero123", "orbit"]
    for model in s["models"]:
        m = s["metrics"][model]
        assert 3 < m["gso/zero123/psnr"] < 40 and 0 < m["gso/orbit/ssim"] <= 1
        assert 0 < m["gso/orbit/cd"] < 1 and 0 <= m["gso/orbit/viou"] <= 1 and 0 <= m["gso/orbit/fscore"] <= 1
        assert m["gso/orbit/cd"] == m["gso/zero123/cd"]  # geometry is per object, repeated per view set
        assert m["gso/orbit/seconds_generate"] > 0 and m["gso/orbit/seconds_reconstruct"] > 0
        assert m["gso/orbit/lpips"] is None  # no AlexNet weights here: unavailable, not a stand-in
    assert "lpips" in s["unavailable"]
    assert s["lineage"]["git_commit"] and s["lineage"]["checkpoints"]["stage1"].endswith("bundle")
    assert s["scale"]["protocol"]["orbit"]["count"] == 4 and s["scale"]["protocol"]["geometry"]["count"] == 8
    rows = list(csv.DictReader(open(res / "objects.csv")))
    assert len(rows) == 2 * 3 * 2
    assert {"object", "model", "view_set", "psnr", "ssim", "lpips", "cd", "viou", "fscore", "seconds_generate",
            "seconds_reconstruct"} <= set(rows[0])
    for obj in ("chicken", "teapot"):
        assert (res / "images" / f"{obj}.png").stat().st_size > 0
        for model in s["models"]:
            assert (res / "ply" / obj / f"{model}.ply").stat().st_size > 0
            assert (res / "turntables" / obj / f"{model}.gif").stat().st_size > 0
    assert (res / "plots" / "metrics.png").is_file()


def test_ground_truth_is_textured_and_cached(evaluation):
    """Both objects rendered with their texture (the one beside the mesh and the one in
    materials/textures/), and the ground truth sits in the cache under its content hash."""
    from geco.data import schema
    from pipelines.render import unpack_members

    root, _, _, _ = evaluation
    gts = sorted((root / "out" / "gt").glob("*.tar"))
    assert [p.name.split("-")[1] for p in gts] == ["chicken", "teapot"]
    for p in gts:
        members = unpack_members(p.read_bytes())
        meta = json.loads(members["meta.json"])
        assert not meta.get("source_warnings") and not meta.get("warnings"), meta
        s = schema.decode_sample({"__key__": p.stem, **members}, with_normals=False)
        assert {"zero123", "orbit", "geometry"} <= set(s)
        rgb, alpha = s["orbit"]["rgb"], s["orbit"]["alpha"]
        obj = rgb.permute(1, 0, 2, 3)[:, alpha[:, 0] > 0.5]
        assert obj.std(dim=1).max() > 0.05  # a patterned texture, not one flat colour
        # depth where the object is (Blender's z pass is not antialiased: a few edge pixels have alpha only)
        assert (s["geometry"]["depth"][s["geometry"]["alpha"] > 0.5] > 0).float().mean() > 0.95


def test_leakage_is_marked(evaluation):
    root, _, out, _ = evaluation
    assert out.leakage["clean"] is False and out.leakage["names"] == ["gso-chicken ~ gso-CHICKEN"]
    s = json.loads((root / "out" / "results" / "summary.json").read_text())
    assert "LEAKAGE" in s["leakage"]["detail"]


def test_mlflow_run(evaluation):
    from mlflow import MlflowClient

    root, cfg, out, _ = evaluation
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.run_name == f"{cfg.name}/evaluate"
    m = run.data.metrics
    assert m["gso/orbit/psnr"] == pytest.approx(out.metrics["stage1"]["gso/orbit/psnr"])  # the primary model
    assert m["teacher/gso/zero123/psnr"] == pytest.approx(out.metrics["teacher"]["gso/zero123/psnr"])
    assert "gso/orbit/lpips" not in m and m["leakage_clean"] == 0.0
    tags = run.data.tags
    assert tags["geco.git.commit"] and tags["geco.config_hash"] and tags["geco.checkpoint.stage1"].endswith("bundle")
    assert tags["geco.input.checkpoint.stage1"] == tags["geco.checkpoint.stage1"]  # the lineage tags (geco.tracking)
    assert tags["geco.dataset.uri"].endswith("shards") and tags["geco.dataset.manifest_uri"].endswith("v000001.json")
    assert tags["geco.evaluate.leakage"].startswith("LEAKAGE")
    arts = {a.path for a in client.list_artifacts(out.mlflow_run_id, "evaluation")}
    assert {"evaluation/summary.json", "evaluation/objects.csv", "evaluation/images"} <= arts


def test_rerun_does_nothing(evaluation):
    _, _, first, second = evaluation
    assert not second.did_work and second.metrics == first.metrics and second.mlflow_run_id == first.mlflow_run_id
    assert "nothing to do" in second.summary()


def test_cli_bad_input_is_one_line_and_keeps_results(evaluation, tmp_path):
    root, _, _, _ = evaluation
    out = ["--output", str(root / "out"), "--set", "tracking.enabled=false"]
    summary = (root / "out" / "results" / "summary.json").read_bytes()
    (tmp_path / "empty" / "x").mkdir(parents=True)
    cases = [
        (["--gso", str(tmp_path / "empty"), "--checkpoint", f"stage1={root / 'bundle'}"], "no objects in the Google"),
        (["--gso", str(root / "gso"), "--checkpoint", f"stage1={tmp_path / 'nope'}"], "does not resolve"),
        (["--gso", str(root / "gso"), "--checkpoint", "stage1"], "expected NAME=URI"),
        (["--gso", str(root / "gso"), "--objects", "lion", "--checkpoint", f"stage1={root / 'bundle'}"],
         "lion not usable"),
    ]
    for argv, expected in cases:
        r = geco("evaluate", *out, *argv)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING:")]
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, r.stderr[-2000:])
    assert (root / "out" / "results" / "summary.json").read_bytes() == summary
