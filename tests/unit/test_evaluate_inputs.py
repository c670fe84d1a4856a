"""pipelines.evaluate without Ray or Blender: the DAG's inputs for evaluate, the GSO folder checks
(textures beside and away from the mesh, a folder without meshes, a missing texture, an unknown
name) and the model URI checks - each bad input one line, before any work."""
from __future__ import annotations

import shutil

import pytest

from geco.config import load_config
from geco.data.procedural import make_gso_object
from geco.models.bundle import init_tiny_bundle
from pipelines import evaluate
from pipelines.dag import DagContext, evaluate_inputs, parse_stages
from pipelines.stage1 import Stage1Outputs


def _cfg(tmp_path, *extra):
    return load_config(None, [f"evaluate.output_uri={tmp_path / 'eval'}", f"stage1.output_uri={tmp_path / 's1'}",
                              f"stage2.output_uri={tmp_path / 's2'}", f"pretrain.output_uri={tmp_path / 'pre'}",
                              f"dataset.uri={tmp_path / 'shards'}",
                              "tracking.enabled=false", *extra])


def test_dag_hands_stage_outputs_to_evaluate(tmp_path):
    cfg = _cfg(tmp_path)
    assert parse_stages("evaluate,render") == ["render", "evaluate"]
    s1 = Stage1Outputs(uris={"bundle": "/b/stage1/bundle"}, teacher_uri="/pre/teacher")
    inputs = evaluate_inputs(DagContext(cfg, None, ["stage1", "evaluate"], {"stage1": s1}))
    assert inputs.models == {"stage1": "/b/stage1/bundle", "teacher": "/pre/teacher", "teacher_1step": "/pre/teacher"}
    assert inputs.dataset_uri == str(tmp_path / "shards")
    # evaluate alone: nothing was trained -> no models (run() then says so); the config's models win
    alone = evaluate_inputs(DagContext(cfg, None, ["evaluate"], {}))
    assert alone.models == {}
    cfg2 = _cfg(tmp_path, "evaluate.models={stage1: s3://b/other}")
    assert evaluate_inputs(DagContext(cfg2, None, ["stage1", "evaluate"], {"stage1": s1})).models["stage1"] == \
        "s3://b/other"


def test_dag_finds_an_earlier_stage1_bundle(tmp_path):
    cfg = _cfg(tmp_path)
    init_tiny_bundle(tmp_path / "s1" / "bundle")
    models = evaluate.dag_models(cfg)
    assert models == {"stage1": str(tmp_path / "s1" / "bundle")}  # no pretrain output: no teacher
    # the tiny random teacher (asked for by name) is distilled, never evaluated as a model
    tiny = Stage1Outputs(uris={"bundle": "/b/stage1/bundle"}, teacher_uri="tiny")
    assert evaluate.dag_models(_cfg(tmp_path, "models.teacher.pretrained=tiny")) == models
    assert evaluate.dag_models(cfg, tiny) == {"stage1": "/b/stage1/bundle"}


def test_gso_layout_textures_beside_and_away(tmp_path):
    root = tmp_path / "gso"
    make_gso_object(1000, 0, root, "away")
    make_gso_object(1001, 0, root, "beside", texture_beside=True)
    assert (root / "away" / "materials" / "textures" / "texture.png").is_file()
    assert (root / "beside" / "meshes" / "texture.png").is_file()
    assert "map_Kd texture.png" in (root / "away" / "meshes" / "model.mtl").read_text()
    refs = evaluate.list_gso(_cfg(tmp_path), str(root))
    assert [r.extra["name"] for r in refs] == ["away", "beside"]
    assert all(not r.warnings() for r in refs)
    assert any(s.endswith("materials/textures/texture.png") for s in refs[0].sidecars)
    only = evaluate.list_gso(_cfg(tmp_path, "evaluate.objects=[beside]"), str(root))
    assert [r.extra["name"] for r in only] == ["beside"]


def test_gso_folder_problems_are_one_line(tmp_path):
    root = tmp_path / "gso"
    (root / "empty_object" / "meshes").mkdir(parents=True)
    (root / "empty_object" / "meshes" / "readme.txt").write_text("no mesh here")
    with pytest.raises(evaluate.EvaluateError, match=r"no objects in the Google Scanned Objects layout") as e:
        evaluate.list_gso(_cfg(tmp_path), str(root))
    assert "\n" not in str(e.value)
    make_gso_object(1000, 0, root, "teapot")
    with pytest.raises(evaluate.EvaluateError, match=r"evaluate.objects: chicken not usable .*it has: teapot"):
        evaluate.list_gso(_cfg(tmp_path, "evaluate.objects=[chicken]"), str(root))
    (root / "teapot" / "materials" / "textures" / "texture.png").unlink()
    with pytest.raises(evaluate.EvaluateError, match=r"missing texture.*teapot: 'texture.png'") as e:
        evaluate.list_gso(_cfg(tmp_path), str(root))
    assert "\n" not in str(e.value)


def test_model_uris_are_checked_before_any_work(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(evaluate.EvaluateError, match="no models to evaluate"):
        evaluate.resolve_models(cfg, {})
    with pytest.raises(evaluate.EvaluateError, match=r"model stage1=.*nowhere does not resolve"):
        evaluate.resolve_models(cfg, {"stage1": str(tmp_path / "nowhere")})
    with pytest.raises(evaluate.EvaluateError, match="model name.*stage3"):
        evaluate.resolve_models(cfg, {"stage3": "x"})
    bundle = init_tiny_bundle(tmp_path / "bundle")
    with pytest.raises(evaluate.EvaluateError, match="no teacher UNet"):
        evaluate.resolve_models(cfg, {"teacher": bundle})
    with pytest.raises(evaluate.EvaluateError, match=r"model teacher=.*neither a Zero123\+\+ teacher folder"):
        evaluate.resolve_models(cfg, {"stage1": bundle, "teacher": str(tmp_path)})
    specs = evaluate.resolve_models(cfg, {"stage1": bundle})
    assert specs["stage1"]["kind"] == "generator" and specs["stage1"]["fingerprint"]
    full = init_tiny_bundle(tmp_path / "full", include_teacher_unet=True)
    specs = evaluate.resolve_models(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"teacher_steps": 7})}), {"teacher": full, "teacher_1step": full})
    assert specs["teacher"]["steps"] == 7 and specs["teacher_1step"]["steps"] == 1
    shutil.rmtree(tmp_path / "full")
    with pytest.raises(evaluate.EvaluateError, match="does not resolve|neither"):
        evaluate.resolve_models(cfg, {"teacher": full})
