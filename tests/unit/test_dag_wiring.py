"""pipelines.dag and pipelines.stage1 without running anything: how stage 1 gets its inputs (what
pretrain trained, the configured weights, or an earlier pretrain output), never by a rewritten config."""
import pytest

from geco.config import load_config
from tests.unit.test_stage1_task import TINY


def write_pretrain_output(root):
    """A folder laid out like the pretrain stage's output: teacher/ + reconstructor/model.safetensors."""
    from geco.models.reconstructors import build_reconstructor, save_reconstructor
    from geco.models.teacher import build_tiny_teacher, save_teacher

    cfg = load_config(None, TINY)
    save_teacher(build_tiny_teacher(cfg.models.teacher), root / "teacher")
    save_reconstructor(build_reconstructor(cfg.models.reconstructor), str(root / "reconstructor" / "model.safetensors"))
    return root


def _ctx(cfg, **outputs):
    from pipelines.dag import DagContext

    return DagContext(cfg=cfg, parent_run_id=None, stages=["pretrain", "stage1"], outputs=outputs)


def test_stage1_sources_follow_pretrain(tmp_path):
    from pipelines.dag import stage1_inputs
    from pipelines.pretrain import PretrainOutputs

    trained = write_pretrain_output(tmp_path / "p")  # what pretrain wrote in this DAG run
    given = write_pretrain_output(tmp_path / "w")  # weights the config names
    pre = PretrainOutputs(output_uri=str(trained), uris={"teacher": str(trained / "teacher")},
                          skipped={"reconstructor": "models.reconstructor.pretrained is set"})
    recon = str(given / "reconstructor" / "model.safetensors")
    cfg = load_config(None, [f"models.reconstructor.pretrained={recon}", f"pretrain.output_uri={tmp_path / 'none'}"])
    s1 = stage1_inputs(_ctx(cfg, pretrain=pre))
    assert (s1.teacher_uri, s1.reconstructor_uri) == (str(trained / "teacher"), recon)  # trained here; given weights
    assert s1.dataset_uri == cfg.dataset.uri and cfg.models.teacher.pretrained == ""  # the config is not rewritten
    assert s1.task_inputs() == {"teacher": str(trained / "teacher"), "reconstructor": recon}
    # no pretrain in this run: the configured weights, else an earlier pretrain output
    cfg = load_config(None, [f"models.teacher.pretrained={given / 'teacher'}", f"pretrain.output_uri={trained}"])
    s1 = stage1_inputs(_ctx(cfg))
    assert (s1.teacher_uri, s1.reconstructor_uri) == (str(given / "teacher"),
                                                      str(trained / "reconstructor" / "model.safetensors"))
    cfg = load_config(None, [f"pretrain.output_uri={given}"])
    s1 = stage1_inputs(_ctx(cfg))
    assert (s1.teacher_uri, s1.reconstructor_uri) == (str(given / "teacher"), recon)
    # nothing anywhere: no teacher is refused in one line; the tiny random one must be asked for by name
    # (the reconstructor still falls back to a tiny random one)
    from pipelines.training import TrainSetupError

    with pytest.raises(TrainSetupError, match=r"^stage1: no teacher: .* --teacher tiny for a tiny random one") as err:
        stage1_inputs(_ctx(load_config(None, [f"pretrain.output_uri={tmp_path / 'none'}"])))
    assert "\n" not in str(err.value)
    cfg = load_config(None, [f"pretrain.output_uri={tmp_path / 'none'}", "models.teacher.pretrained=tiny"])
    s1 = stage1_inputs(_ctx(cfg))
    assert (s1.teacher_uri, s1.reconstructor_uri) == ("tiny", "")


def test_stage1_inputs_from_a_pretrain_output(tmp_path):
    """`geco train stage1 --teacher/--reconstructor`: the weights themselves or a pretrain output holding them."""
    from pipelines.stage1 import default_inputs
    from pipelines.training import TrainSetupError

    pre = write_pretrain_output(tmp_path / "pre")
    cfg = load_config(None, TINY + [f"pretrain.output_uri={tmp_path / 'elsewhere'}"])
    for value in (str(tmp_path / "pre"), str(tmp_path / "pre") + "/"):
        s1 = default_inputs(cfg, teacher=value, reconstructor=value)
        assert s1.teacher_uri == str(pre / "teacher")
        assert s1.reconstructor_uri == str(pre / "reconstructor" / "model.safetensors")
    s1 = default_inputs(cfg, teacher=str(pre / "teacher"))
    assert s1.teacher_uri == str(pre / "teacher") and s1.reconstructor_uri == ""
    with pytest.raises(TrainSetupError, match="pretrain"):
        default_inputs(cfg, teacher=str(tmp_path))
    assert default_inputs(cfg, teacher="tiny").teacher_uri == "tiny"  # `--teacher tiny`
    with pytest.raises(TrainSetupError, match="no reconstructor weights"):
        default_inputs(cfg, reconstructor=str(tmp_path))


def test_pseudo_gt_runs_the_teacher_and_reconstructor_stage1_uses(tmp_path):
    from pipelines.dag import STAGES, STEPS, pseudo_gt_inputs
    from pipelines.pretrain import PretrainOutputs
    from pipelines.render import RenderOutputs

    assert STAGES.index("pseudo_gt") == STAGES.index("stage1") + 1 and STEPS["pseudo_gt"].inputs is pseudo_gt_inputs
    trained = write_pretrain_output(tmp_path / "p")
    pre = PretrainOutputs(output_uri=str(trained), uris={"teacher": str(trained / "teacher"),
                                                         "reconstructor": str(trained / "reconstructor")})
    rendered = RenderOutputs(dataset_uri=str(tmp_path / "shards"), manifest_uri=None, failures_uri=None)
    cfg = load_config(None, [f"pretrain.output_uri={tmp_path / 'none'}"])
    inputs = pseudo_gt_inputs(_ctx(cfg, render=rendered, pretrain=pre))
    assert inputs.dataset_uri == str(tmp_path / "shards")
    assert (inputs.teacher_uri, inputs.reconstructor_uri) == (
        str(trained / "teacher"), str(trained / "reconstructor" / "model.safetensors"))
