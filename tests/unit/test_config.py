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
