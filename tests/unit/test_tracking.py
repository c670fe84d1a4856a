"""geco.tracking: one MLflow wrapper for the driver (start_run) and the workers (Tracker.attach)."""
import numpy as np

from geco.config import TrackingConfig
from geco.tracking import Tracker, start_run


def test_driver_and_worker_log_into_the_same_run_and_a_disabled_tracker_does_nothing(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = TrackingConfig(uri=uri, experiment="t")
    with start_run(cfg, "stage", tags={"geco.stage": "s"}) as driver:
        driver.log_params({"a": {"b": 1}, "c": [1, 2]})
        driver.set_tags({"geco.x": "y"})
        worker = Tracker.attach(uri, driver.run_id)  # what rank 0 of a Ray Train job does
        worker.log_metrics({"train/loss": 0.5}, 3)
        worker.log_image(np.zeros((4, 4, 3), np.uint8), "samples/step_00000003.png")
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "model.safetensors").write_bytes(b"x")
        worker.log_artifacts(tmp_path / "w", "weights/m")
        driver.log_table([{"stage": "s", "n": 1}], "stages.json")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(driver.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1", "c": "[1, 2]"}
    assert run.data.tags["geco.x"] == "y" and run.data.tags["geco.stage"] == "s"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(3, 0.5)]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "weights", "stages.json"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights/m")] == ["weights/m/model.safetensors"]

    off = Tracker.attach(uri, None)
    assert not off.enabled and off.run_id is None
    off.log_metrics({"x": 1.0}, 0)  # no-ops
    off.log_params({"x": 1})
    with start_run(TrackingConfig(uri=uri, enabled=False), "off") as t:
        assert not t.enabled and t.run_id is None
        t.set_tags({"x": "y"})
