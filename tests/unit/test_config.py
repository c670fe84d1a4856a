"""Typed configs: validation errors name the file and the field; overrides keep other defaults."""
import pytest

from cli.main import main
from geco.config import ConfigError, GecoConfig, load_config


def test_partial_section_keeps_the_sections_own_defaults():
    base = GecoConfig()
    cfg = load_config(None, ["pretrain.reconstructor.steps=5"])
    assert cfg.pretrain.reconstructor.steps == 5
    assert cfg.pretrain.reconstructor.lr == base.pretrain.reconstructor.lr == 4e-4


def test_error_names_file_field_and_allowed_values(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  blender:\n    samples: 0\n    engine: WORKBENCH\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "render.blender.samples" in msg and "render.blender.engine" in msg
    assert "CYCLES" in msg and "bogus" in msg
    # the command line says the same in one line, exit status 2, before any work (no Ray, no tracking)
    assert main(["render", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geco: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(bad) in err and "render.blender.samples" in err and "render.blender.engine" in err and "CYCLES" in err


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


# --------------------------------------------------------------------------------------------
# Hardening (issue #10 item 9): unreadable files, duplicate keys, angles and timeouts. Each is one
# line naming the file (or --set) and the field, with the fix.
# --------------------------------------------------------------------------------------------
def _one_line_error(*args) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    assert "\n" not in str(e.value) and e.value.__suppress_context__, str(e.value)
    return str(e.value)


def test_a_config_that_is_not_utf8_is_named_with_its_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: geco-local\ntracking:\n  experiment: caf\u00e9\n".encode("latin-1"))
    assert _one_line_error(bad) == f"{bad}: not UTF-8 text (byte 0xe9 at line 3); save the file as UTF-8"
    bom = tmp_path / "bom.yaml"  # a UTF-8 byte-order mark is UTF-8
    bom.write_bytes(b"\xef\xbb\xbfrender:\n  seed: 3\n")
    assert load_config(bom).render.seed == 3


def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("render:\n  blender:\n    samples: 8\n    device: CPU\n    samples: 32\n")
    assert _one_line_error(dup) == (f"{dup}: duplicate key 'samples' at line 5 (first at line 3); keep only one")
    top = tmp_path / "top.yaml"
    top.write_text("render:\n  seed: 1\nname: a\nrender:\n  seed: 2\n")
    assert "duplicate key 'render' at line 4 (first at line 1)" in _one_line_error(top)
    msg = _one_line_error(None, ["render.random.elevation_range={a: 1, a: 2}"])
    assert msg.startswith("--set 'render.random.elevation_range={a: 1, a: 2}': duplicate key 'a'")
    merged = tmp_path / "merge.yaml"  # YAML merge keys may still be overridden
    merged.write_text("render:\n  cond: &v {radius: 1.25, resolution: 64}\n  random:\n    <<: *v\n    resolution: 32\n")
    cfg = load_config(merged)
    assert (cfg.render.random.radius, cfg.render.random.resolution, cfg.render.cond.resolution) == (1.25, 32, 64)


def test_broken_yaml_is_one_line_with_line_and_column(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("render:\n  seed: 1\n   depth: true\n")
    msg = _one_line_error(bad)
    assert msg.startswith(f"{bad}: not valid YAML: line 3, column ")
    msg = _one_line_error(None, ["render.random.elevation_range=[1,"])
    assert msg.startswith("--set 'render.random.elevation_range=[1,': the value is not valid YAML (line ")


@pytest.mark.parametrize("override,field", [
    ("render.cond.elevation_range=[-10, 95]", "render.cond.elevation_range.1"),
    ("render.random.elevation_range=[-91, 10]", "render.random.elevation_range.0"),
    ("render.zero123.elevations=[20, -120]", "render.zero123.elevations.1"),
])
def test_elevations_stay_within_the_poles(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"  {field}: Input should be " in str(e.value) and ("-90" in str(e.value) or " 90" in str(e.value))
    poles = load_config(None, ["render.random.elevation_range=[-90, 90]"])  # the poles themselves are fine
    assert poles.render.random.elevation_range == (-90.0, 90.0)


@pytest.mark.parametrize("override,field", [
    ("render.blender.timeout_s=.inf", "render.blender.timeout_s"),
    ("render.blender.timeout_s=.nan", "render.blender.timeout_s"),
    ("render.cond.radius=.inf", "render.cond.radius"),
    ("render.random.fov_deg=.nan", "render.random.fov_deg"),
    ("render.blender.light_strength=.inf", "render.blender.light_strength"),
])
def test_timeouts_and_view_geometry_are_finite(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"  {field}: Input should be a finite number" in str(e.value)
# -- the reconstructor section and the checks of models against renders -------------------------
def test_reconstructor_kind_sections_and_moved_flat_fields(tmp_path):
    cfg = load_config("configs/local.yaml")
    assert cfg.models.reconstructor.kind == "lgm" and cfg.models.reconstructor.lgm.down_channels == (16, 32, 64)
    old = tmp_path / "old.yaml"
    old.write_text("models:\n  reconstructor:\n    input_size: 32\n    down_channels: [8, 16, 32]\n    num_heads: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(old)
    msg = str(e.value)
    assert str(old) in msg
    assert "models.reconstructor.down_channels: moved to models.reconstructor.lgm.down_channels" in msg
    assert "models.reconstructor.num_heads: moved to models.reconstructor.lgm.num_heads" in msg
    with pytest.raises(ConfigError, match="moved to models.reconstructor.lgm.norm_groups"):
        load_config(None, ["models.reconstructor.norm_groups=4"])
    with pytest.raises(ConfigError, match="models.reconstructor.kind"):
        load_config(None, ["models.reconstructor.kind=instantmesh"])


def test_reconstructor_input_size_must_fit_the_unet_downsamples():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["models.reconstructor.input_size=40"])
    msg = str(e.value)
    assert "models.reconstructor.input_size=40 must be divisible by 32" in msg
    assert "models.reconstructor.lgm.down_channels" in msg and "Value error" not in msg
    load_config(None, ["models.reconstructor.input_size=40", "models.reconstructor.lgm.down_channels=[8,16,32,32]",
                       "models.reconstructor.lgm.down_attention=[false,false,true,true]"])  # 3 downsamples: 40 = 5 x 8


def test_teacher_tile_must_not_exceed_the_rendered_views():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["render.zero123.resolution=64", "models.teacher.tile_size=128"])
    line = [x for x in str(e.value).splitlines()[1:] if "render.zero123.resolution" in x]  # [0]: the --set echo
    assert len(line) == 1 and "models.teacher.tile_size=128" in line[0] and "render at >= 128 px" in line[0]
    load_config(None, ["render.zero123.resolution=128", "models.teacher.tile_size=128"])
    load_config(None, ["render.zero123.resolution=320", "models.teacher.tile_size=64"])  # downsampled: fine


def test_zero123_elevations_of_renders_and_reconstructor_agree():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["models.reconstructor.zero123_elevations=[30,-20]"])
    msg = str(e.value)
    assert "render.zero123.elevations=[20.0, -10.0]" in msg and "models.reconstructor.zero123_elevations=[30.0, -20.0]" in msg
    load_config(None, ["models.reconstructor.zero123_elevations=[30,-20]", "render.zero123.elevations=[30,-20]"])
    # GECO's own quirk (LGM told v1.1's 30/-20 for v1.2's views) only with both models pretrained
    load_config(None, ["models.reconstructor.zero123_elevations=[30,-20]", "models.teacher.pretrained=/w/teacher",
                       "models.reconstructor.pretrained=/w/lgm.safetensors"])
    with pytest.raises(ConfigError, match="zero123_elevations"):
        load_config(None, ["models.reconstructor.zero123_elevations=[30,-20]", "models.teacher.pretrained=/w/teacher"])
