"""geco.registry's promotion rule and geco.tracking's lineage tags (no MLflow server, no Ray)."""
import hashlib
import subprocess

import pytest

from geco.config import ConfigError, RegistryConfig, load_config
from geco.data import shards
from geco.registry import clean_metrics, decide, metric_tags, metrics_from_tags, regressions
from geco.tracking import config_hash, git_state, lineage_tags, redact_uri

PROD = {"gso/zero123/psnr": 20.0, "gso/zero123/lpips": 0.20, "gso/orbit/cd": 0.050, "gso/orbit/fscore": 0.60,
        "gso/orbit/seconds_generate": 1.0}


def test_no_production_yet_promotes_and_a_regression_beyond_the_tolerance_keeps_production():
    cfg = RegistryConfig(tolerance=0.02)
    d = decide(PROD, None, cfg)
    assert d.promote and "no production version yet" in d.why
    # within 2% everywhere (psnr -1%, lpips +1.5%, cd +1%): promote; timings are not gated
    ok = {**PROD, "gso/zero123/psnr": 19.8, "gso/zero123/lpips": 0.203, "gso/orbit/cd": 0.0505,
          "gso/orbit/seconds_generate": 50.0}
    d = decide(ok, PROD, cfg, "3")
    assert d.promote and "production version 3" in d.why and len(d.compared) == 4
    # lower-is-better metrics regress upwards, higher-is-better ones downwards
    bad = {**PROD, "gso/orbit/cd": 0.060, "gso/zero123/psnr": 18.0}
    d = decide(bad, PROD, cfg, "3")
    assert not d.promote and d.regressed == ["gso/orbit/cd 0.06 > 0.05 (+20.0%)", "gso/zero123/psnr 18 < 20 (-10.0%)"]
    assert "production stays" in d.why and "gso/orbit/cd" in d.why
    better = {**PROD, "gso/orbit/cd": 0.040, "gso/zero123/psnr": 22.0, "gso/zero123/lpips": 0.1}
    assert decide(better, PROD, cfg).promote
    # a looser tolerance accepts the 10-20% regressions
    assert decide(bad, PROD, RegistryConfig(tolerance=0.25)).promote


def test_missing_metrics_never_promote_silently():
    cfg = RegistryConfig()
    d = decide({}, PROD, cfg, "1")
    assert not d.promote and "no GSO metrics" in d.why
    d = decide({"gso/orbit/seconds_generate": 1.0}, PROD, cfg, "1")  # timings only: nothing gated
    assert not d.promote
    d = decide({"gso/orbit/viou": 0.5}, PROD, cfg, "1")  # nothing in common with production
    assert not d.promote and "share no GSO metric" in d.why
    d = decide(PROD, {}, cfg, "1")  # production was registered without metrics
    assert d.promote and "has no GSO metrics" in d.why
    assert not decide(PROD, None, RegistryConfig(promote="never")).promote
    assert decide({}, PROD, RegistryConfig(promote="always")).promote
    # unavailable metrics (None / NaN, e.g. LPIPS without weights) are left out, never compared as 0
    cleaned = clean_metrics({"gso/orbit/lpips": None, "gso/orbit/psnr": float("nan"), "gso/orbit/cd": 0.1,
                             "flag": True, "name": "x"})
    assert cleaned == {"gso/orbit/cd": 0.1}
    assert regressions(cleaned, PROD, 0.0, ["cd", "lpips"]) == (["gso/orbit/cd 0.1 > 0.05 (+100.0%)"], ["gso/orbit/cd"])


def test_metrics_round_trip_through_version_tags():
    tags = {**metric_tags(PROD), "geco.bundle_id": "abc", "gso/orbit/bad": "n/a"}
    assert metrics_from_tags(tags) == PROD


def test_registry_config_names():
    cfg = load_config(None, ["registry.model_name=geco-paper", "registry.tolerance=0.05"])
    assert cfg.registry.model_name == "geco-paper" and cfg.registry.tolerance == 0.05
    with pytest.raises(ConfigError, match="registry.model_name"):
        load_config(None, ["registry.model_name=geco@x"])
    with pytest.raises(ConfigError, match="registry.tolerance"):
        load_config(None, ["registry.tolerance=-1"])


def test_git_state_of_a_checkout_clean_dirty_and_none(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    sha = git("rev-parse", "HEAD")
    assert git_state(repo) == (sha, "false")
    (repo / "new.py").write_text("untracked\n")  # untracked files do not make it dirty
    assert git_state(repo) == (sha, "false")
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == (sha, "true")
    (tmp_path / "plain").mkdir()
    assert git_state(tmp_path / "plain") == ("none", "none")


def test_lineage_tags_name_code_config_data_and_inputs(tmp_path):
    data = tmp_path / "shards"
    cfg = load_config(None, [f"dataset.uri={data}"])
    tags = lineage_tags(cfg, dataset_uri=str(data), inputs={"teacher": "s3://b/teacher", "reconstructor": ""})
    assert tags["geco.dataset.manifest_uri"] == "none" and tags["geco.dataset.manifest_hash"] == "none"
    assert tags["geco.input.teacher"] == "s3://b/teacher" and tags["geco.input.reconstructor"] == "none"
    assert tags["geco.config_hash"] == config_hash(cfg) != config_hash(load_config(None, ["name=other"]))
    assert tags["geco.git.commit"] == git_state()[0]  # this checkout (or "none" outside one)
    uri = shards.write_manifest_version(str(data), settings_hash="s", source_list_hash="l",
                                        state={"location": {}, "shards": [], "objects": {}, "next_index": 0})
    tags = lineage_tags(cfg, dataset_uri=str(data))
    assert tags["geco.dataset.manifest_uri"] == uri
    assert tags["geco.dataset.manifest_hash"] == hashlib.sha256(open(uri, "rb").read()).hexdigest()
    assert tags["geco.dataset.uri"] == str(data) and not any(k.startswith("geco.input.") for k in tags)
    # credentials inside a URI never reach a tag
    tags = lineage_tags(cfg, inputs={"teacher": "https://user:hunter2@host/teacher"})
    assert tags["geco.input.teacher"] == "https://host/teacher"
    assert redact_uri("s3://bucket/key@v1") == "s3://bucket/key@v1"


def test_dag_registers_the_final_bundle_with_evaluates_metrics_for_it(tmp_path):
    from types import SimpleNamespace

    from geco.models.bundle import init_tiny_bundle
    from pipelines import dag
    from pipelines.stage1 import Stage1Outputs

    cfg = load_config(None, [f"stage1.output_uri={tmp_path / 'stage1'}", f"stage2.output_uri={tmp_path / 'stage2'}"])
    s1 = Stage1Outputs(uris={"bundle": "/b/stage1"}, mlflow_run_ids={"stage1": "r1"})
    s2 = SimpleNamespace(bundle_uri="/b/stage2", mlflow_run_id="r2")  # stage 2's outputs (its own helper's class)
    ev = SimpleNamespace(metrics={"stage1": {"gso/orbit/psnr": 10.0}, "stage2": {"gso/orbit/psnr": 12.0}},
                         mlflow_run_id="e1")

    def ctx(**outputs):
        return dag.DagContext(cfg=cfg, parent_run_id="p", stages=list(dag.STAGES), outputs=outputs)

    got = dag.register_inputs(ctx(stage1=s1, stage2=s2, evaluate=ev))
    assert (got.bundle_uri, got.metrics, got.evaluate_run_id) == ("/b/stage2", {"gso/orbit/psnr": 12.0}, "e1")
    assert got.lineage["bundle_run_id"] == "r2" and got.lineage["stage1_run_id"] == "r1"
    assert got.lineage["dag_run_id"] == "p" and got.lineage["bundle_stage"] == "stage2"
    got = dag.register_inputs(ctx(stage1=s1))  # no stage 2, no evaluation: stage 1's bundle, no metrics
    assert (got.bundle_uri, got.metrics, got.evaluate_run_id) == ("/b/stage1", {}, None)
    with pytest.raises(ConfigError, match="no bundle to register"):  # `--stages register` with nothing trained
        dag.register_inputs(ctx())
    init_tiny_bundle(tmp_path / "stage1" / "bundle")
    assert dag.register_inputs(ctx()).bundle_uri == str(tmp_path / "stage1" / "bundle")
    assert dag.STAGES[-1] == "register" and dag.parse_stages("register,stage1") == ["stage1", "register"]
    # the registry lives in MLflow: refused before any stage runs when tracking is off
    off = load_config(None, ["tracking.enabled=false", f"dataset.uri={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="tracking.enabled is false"):
        dag.run(off, stages="render,register")
    assert not (tmp_path / "none").exists()
