"""pipelines.dag without running anything: how stage 1 picks up what pretrain trained."""
from geco.config import load_config


def test_stage1_sources_follow_pretrain():
    from pipelines.dag import stage1_config
    from pipelines.pretrain import PretrainOutputs

    pre = PretrainOutputs(output_uri="/p", teacher_uri="/p/teacher", skipped={"reconstructor": "models.reconstructor.pretrained is set"})
    cfg = load_config(None, ["stage1.teacher=pretrain", "stage1.reconstructor=pretrain",
                             "models.reconstructor.pretrained=/w/recon.safetensors"])
    s1 = stage1_config(cfg, pre).stage1
    assert (s1.teacher, s1.reconstructor) == ("/p/teacher", "")  # trained here; given weights
    s1 = stage1_config(load_config(None, ["stage1.teacher=/mine"]), pre).stage1
    assert (s1.teacher, s1.reconstructor) == ("/mine", "")  # an explicit URI stays
    assert stage1_config(load_config(None, ["stage1.teacher=pretrain"]), None).stage1.teacher == "pretrain"
