"""A training job with a bad config fails before training starts, with one clear line: an unknown
field, a dataset without a manifest or with a shard file gone, GPUs (or CPUs) asked for that the
Ray cluster does not have. Nothing is written: no MLflow run (the sqlite store is never created),
no Ray Train run folder, no output folder.

The datasets are built with the shard writer (bytes that are never decoded: the checks read the
manifest and list the folder, never the samples), so no Blender is needed; Ray is the real local
one of the ``ray_local`` fixture (2 CPUs, no GPU).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from geco.config import load_config
from geco.data.shards import ShardWriter, write_manifest_version
from tests.console import own_lines


def make_dataset(root: Path | str, n: int = 4, per_shard: int = 2) -> str:
    """``n`` train objects in ``n / per_shard`` shards + a manifest (samples with a placeholder member)."""
    out = str(root)
    with ShardWriter(out, per_shard) as w:
        for i in range(n):
            w.add({"__key__": f"obj-{i}", "cond.png": b"not decoded here"}, f"h{i}", "train")
    write_manifest_version(out, settings_hash="test", source_list_hash="test")
    return out


@pytest.fixture
def setup(tmp_path):
    """A good config file (tiny models, local outputs under tmp_path) and the places nothing may appear."""
    data = make_dataset(tmp_path / "shards")
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"""
name: preflight-test
dataset: {{uri: {data}}}
tracking: {{uri: "sqlite:///{tmp_path / 'm.db'}", experiment: preflight}}
models:
  teacher: {{tile_size: 16, cond_size: 32}}
pretrain:
  output_uri: {tmp_path / 'pretrained'}
  teacher: {{steps: 2, cpus_per_worker: 0.5, storage_path: {tmp_path / 'train'}}}
  reconstructor: {{steps: 2, cpus_per_worker: 0.5, storage_path: {tmp_path / 'train'}}}
stage1:
  output_uri: {tmp_path / 'stage1'}
  train: {{steps: 2, cpus_per_worker: 0.5, storage_path: {tmp_path / 'train'}}}
""")
    written = [tmp_path / "m.db", tmp_path / "train", tmp_path / "pretrained", tmp_path / "stage1"]
    return cfg_file, data, written


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit status, what geco printed to stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, "".join(f"{ln}\n" for ln in own_lines(err))


def assert_nothing_written(written: list[Path]) -> None:
    assert [p for p in written if p.exists()] == []


JOB = {"stage1": "stage1.train", "pretrain": "pretrain.teacher"}  # the job section each stage trains first


def train(stage: str) -> list[str]:
    """``geco train <stage>``; stage 1 on the tiny random teacher, asked for by name (nothing is pretrained here)."""
    return ["train", stage] + (["--teacher", "tiny"] if stage == "stage1" else [])


def test_stage1_without_a_teacher_is_refused_in_one_line(capsys, setup):
    cfg_file, _, written = setup
    rc, err = run_cli(capsys, "train", "stage1", "--config", str(cfg_file))
    assert rc == 2, err
    assert "stage1: no teacher" in err and "geco train pretrain" in err and "--teacher tiny" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert_nothing_written(written)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_unknown_field_names_the_file_the_field_and_a_suggestion(tmp_path, capsys, setup, stage):
    cfg_file, _, written = setup
    bad = tmp_path / "bad.yaml"
    line = {"stage1": "  train: {steps: 2,", "pretrain": "  teacher: {steps: 2,"}[stage]
    assert line in cfg_file.read_text()
    bad.write_text(cfg_file.read_text().replace(line, line.replace("steps", "stepz")))
    rc, err = run_cli(capsys, *train(stage), "--config", str(bad))
    assert rc == 2, err
    assert str(bad) in err and f"{JOB[stage]}.stepz: unknown field; did you mean 'steps'?" in err, err
    assert_nothing_written(written)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_dataset_without_a_manifest(tmp_path, capsys, setup, ray_local, stage):
    cfg_file, _, written = setup
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file), "--data", str(tmp_path / "empty"))
    assert rc == 2, err
    assert f"dataset.uri={tmp_path / 'empty'}: no shard manifest" in err and "geco render" in err, err
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file), "--data", str(tmp_path / "nowhere"))
    assert rc == 2 and f"dataset.uri={tmp_path / 'nowhere'}: no such folder" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert_nothing_written(written)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_manifest_whose_shard_file_is_gone(tmp_path, capsys, setup, ray_local, stage):
    cfg_file, data, written = setup
    (Path(data) / "shard-000001.tar").unlink()
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file))
    assert rc == 2, err
    assert f"dataset.uri={data}: 1 shard file(s) listed by its manifest v000001 are missing" in err, err
    assert "(shard-000001.tar; 2 object(s))" in err and "shard-000001.json" in err and "geco render" in err, err
    assert_nothing_written(written)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_truncated_shard_is_named_before_training(tmp_path, capsys, setup, stage):
    """Issue #10 item 7: a shard cut short in a copy used to pass the checks and fail deep in Ray Data
    (tarfile.ReadError naming no shard, or objects silently missing). Its size differs from the manifest's
    record: one line names it and the fix, before Ray is even joined."""
    cfg_file, data, written = setup
    shard = Path(data) / "shard-000001.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 700)
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file))
    assert rc == 2, err
    assert f"dataset.uri={data}: 1 shard file(s) are not the files its manifest v000001 recorded" in err, err
    assert f"(shard-000001.tar: {size - 700} bytes, the manifest recorded {size}; 2 object(s))" in err, err
    assert "shard-000001.json" in err and "geco render" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert_nothing_written(written)


def test_damaged_shard_of_the_right_size_is_found_with_verify_hashes(setup):
    from pipelines.training import TrainSetupError, check_dataset

    _, data, _ = setup
    shard = Path(data) / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # a flipped byte inside the first member's header: same size
    shard.write_bytes(bytes(raw))
    assert check_dataset(data)["counts"]["train"] == 4  # sizes only (the default): not noticed
    with pytest.raises(TrainSetupError, match=r"\(shard-000000\.tar: its sha256 differs from the manifest's; "
                                              r"2 object\(s\)\)"):
        check_dataset(data, verify_hashes=True)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_gpu_asked_for_on_a_cluster_without_one(capsys, setup, ray_local, stage):
    cfg_file, _, written = setup
    job = JOB[stage]
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file), "--set", f"{job}.use_gpu=true",
                      "--set", f"{job}.num_workers=2")
    assert rc == 2, err
    assert f"{job}.use_gpu=true asks for 2 GPU(s) (num_workers 2 x gpus_per_worker 1) but the Ray cluster at" in err
    assert f"has 0; set {job}.use_gpu=false" in err and f"{job}.wait_for_resources=true" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert_nothing_written(written)


@pytest.mark.parametrize("job", ["stage1.train", "pretrain.reconstructor"])
def test_dag_checks_every_training_job_before_rendering(capsys, setup, ray_local, job):
    """`geco run` on a cluster without GPUs fails before its first stage: nothing rendered, no run."""
    cfg_file, data, written = setup
    shards_before = sorted(p.name for p in Path(data).iterdir())
    rc, err = run_cli(capsys, "run", "--config", str(cfg_file), "--set", f"{job}.use_gpu=true")
    assert rc == 2, err
    assert f"{job}.use_gpu=true asks for 1 GPU(s)" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in Path(data).iterdir()) == shards_before
    assert_nothing_written(written)


@pytest.mark.parametrize("stage", ["stage1", "pretrain"])
def test_more_cpus_than_the_cluster_has(capsys, setup, ray_local, stage):
    cfg_file, _, written = setup
    job = JOB[stage]
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file), "--set", f"{job}.num_workers=3",
                      "--set", f"{job}.cpus_per_worker=1")
    assert rc == 2, err
    assert f"{job} asks for 3 CPU(s) (num_workers 3 x cpus_per_worker 1) but the Ray cluster at" in err, err
    assert "has 2;" in err, err
    # fits, but leaves Ray Data no CPU to read the shards with: would hang as well
    rc, err = run_cli(capsys, *train(stage), "--config", str(cfg_file), "--set", f"{job}.cpus_per_worker=1.5")
    assert rc == 2, err
    assert f"{job}: its workers take 1.5 CPU(s)" in err and "leaving 0.5; Ray Data" in err, err
    assert_nothing_written(written)


def test_concurrent_pretrain_jobs_share_the_cpus(capsys, setup, ray_local):
    cfg_file, _, written = setup
    rc, err = run_cli(capsys, "train", "pretrain", "--config", str(cfg_file), "--set", "pretrain.concurrent=true",
                      "--set", "pretrain.teacher.cpus_per_worker=1", "--set", "pretrain.reconstructor.cpus_per_worker=0.5")
    assert rc == 2, err
    assert "pretrain.teacher: its workers take 1 CPU(s)" in err and "and 0.5 by the concurrent job(s)" in err, err
    assert_nothing_written(written)


def test_the_python_entry_points_raise_before_anything_is_written(setup, ray_local):
    from pipelines import pretrain, stage1
    from pipelines.training import TrainSetupError

    cfg_file, _, written = setup
    cfg = load_config(cfg_file, ["stage1.train.use_gpu=true"])
    with pytest.raises(TrainSetupError, match=r"stage1\.train\.use_gpu=true asks for 1 GPU\(s\)"):
        stage1.run(cfg, stage1.default_inputs(cfg, teacher="tiny"))
    cfg = load_config(cfg_file, ["pretrain.reconstructor.use_gpu=true"])
    with pytest.raises(TrainSetupError, match=r"pretrain\.reconstructor\.use_gpu=true asks for 1 GPU\(s\)"):
        pretrain.run(cfg)
    assert_nothing_written(written)


def test_a_good_config_passes_and_wait_for_resources_skips_the_cluster_check(tmp_path, setup, ray_local):
    from pipelines.training import check_resources, preflight

    cfg_file, data, _ = setup
    cfg = load_config(cfg_file)
    manifest = preflight(cfg, ["pretrain.teacher", "pretrain.reconstructor"], dataset_uri=data,
                         output_uri=str(tmp_path / "pretrained"), concurrent=True)
    assert manifest["counts"] == {"train": 4, "val": 0}
    assert (tmp_path / "pretrained").is_dir() and (tmp_path / "train").is_dir()  # the writable checks made them
    assert not (tmp_path / "m.db").exists()
    cfg = load_config(cfg_file, ["stage1.train.use_gpu=true", "stage1.train.num_workers=64",
                                 "stage1.train.wait_for_resources=true"])
    check_resources(cfg, "stage1.train")  # an autoscaling cluster may add the GPU nodes: Ray waits


def test_workers_that_fit_no_single_node(setup, ray_local, monkeypatch):
    """Enough GPUs in all, but on nodes too small for one worker each: named per node."""
    import ray

    from pipelines.training import TrainSetupError, check_resources

    cfg_file, _, _ = setup
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}} for _ in range(2)]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    cfg = load_config(cfg_file, ["stage1.train.use_gpu=true", "stage1.train.gpus_per_worker=2"])
    with pytest.raises(TrainSetupError, match=r"only 0 of num_workers=1 worker\(s\) fit on the nodes") as e:
        check_resources(cfg, "stage1.train")
    assert "{CPU: 8, GPU: 1}, {CPU: 8, GPU: 1}" in str(e.value)
    check_resources(load_config(cfg_file, ["stage1.train.use_gpu=true", "stage1.train.num_workers=2"]),
                    "stage1.train")  # one GPU per worker: fits


def test_s3_dataset_checks(s3_bucket):
    """The same dataset checks on S3: one listing of the prefix; a missing bucket is named with the endpoint."""
    from geco import storage
    from geco.storage import StorageError
    from pipelines.training import TrainSetupError, check_dataset

    data = make_dataset(f"{s3_bucket}/shards", n=6)
    assert check_dataset(data)["counts"]["train"] == 6
    storage.delete(f"{data}/shard-000002.tar")
    with pytest.raises(TrainSetupError, match=r"1 shard file\(s\) listed by its manifest v000001 are missing "
                                              r"\(shard-000002\.tar; 2 object\(s\)\)"):
        check_dataset(data)
    with pytest.raises(TrainSetupError, match="no shard manifest"):
        check_dataset(f"{s3_bucket}/elsewhere")
    with pytest.raises(StorageError, match="cannot read from S3 endpoint"):
        check_dataset("s3://no-such-bucket-geco/shards")
