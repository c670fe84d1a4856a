"""Typed configs: validation errors name the file and the field; overrides keep other defaults."""
import pytest

from geco.config import ConfigError, GecoConfig, load_config


def test_partial_section_keeps_the_sections_own_defaults():
    base = GecoConfig()
    cfg = load_config(None, ["pretrain.reconstructor.steps=5"])
    assert cfg.pretrain.reconstructor.steps == 5
    assert cfg.pretrain.reconstructor.lr == base.pretrain.reconstructor.lr == 4e-4


def test_error_names_file_field_and_allowed_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  blender:\n    samples: 0\n    engine: WORKBENCH\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "render.blender.samples" in msg and "render.blender.engine" in msg
    assert "CYCLES" in msg and "bogus" in msg


def test_overrides_parse_yaml_scalars_and_reject_garbage():
    cfg = load_config(None, ["render.random.count=3", "source.exclude_licenses=[by-nc, by-nc-sa]", "source.uri="])
    assert cfg.render.random.count == 3 and cfg.source.exclude_licenses == ["by-nc", "by-nc-sa"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["render.random.count"])


def test_shipped_configs_validate():
    for name in ("configs/local.yaml", "configs/paper.yaml"):
        load_config(name)


def test_unknown_field_in_a_nested_section_is_named_with_a_suggestion_or_the_allowed_fields(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("stage1:\n  train:\n    stepz: 5\npretrain:\n  teacher:\n    use_gpus: true\n  reconstructr: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg
    assert "stage1.train.stepz: unknown field; did you mean 'steps'? (got 5)" in msg
    assert "pretrain.teacher.use_gpus: unknown field; did you mean 'use_gpu'?" in msg
    assert "pretrain.reconstructr: unknown field; did you mean 'reconstructor'?" in msg
    with pytest.raises(ConfigError) as e:  # nothing close: the section's fields are listed
        load_config(None, ["stage1.train.xyzzy=1"])
    assert "stage1.train.xyzzy: unknown field; stage1.train has: steps, batch_size," in str(e.value)
    assert "wait_for_resources" in str(e.value)


def test_paper_config_trains_at_paper_scale():
    """configs/paper.yaml: stage 1 as PAPER.md says; GPU jobs that wait for the autoscaler's nodes
    (the cluster check is a runtime pre-flight, never part of validation)."""
    cfg = load_config("configs/paper.yaml")
    s1 = cfg.stage1
    assert (s1.train.steps, s1.lr_generator, s1.lr_fake, s1.teacher_cfg, s1.fake_cfg) == (5000, 1e-6, 1e-6, 4.0, 1.0)
    assert (s1.t_min, s1.t_max, s1.train.lr_schedule, s1.fake_score) == (0.02, 0.98, "constant", "full")
    for job in (s1.train, cfg.pretrain.teacher, cfg.pretrain.reconstructor):
        assert job.use_gpu and job.wait_for_resources and job.mixed_precision == "bf16" and job.gradient_checkpointing
        assert job.storage_path.startswith("s3://")
    assert GecoConfig().stage1.train.wait_for_resources is False  # the default fails fast instead
