"""The driver draws a training job's progress bar from what rank 0 reports (workers' output is not
forwarded to the console): a board actor on the real local Ray, a reporter that finds it by name."""
from __future__ import annotations

import ray

from pipelines.training.progress import DriverProgress, StepReporter


def test_rank0_steps_reach_the_drivers_bar(ray_local):
    with DriverProgress("stage1 steps", steps=10, poll_s=0.05) as progress:
        reporter = StepReporter(progress.actor_name, rank=0, min_interval_s=0.0)
        other = StepReporter(progress.actor_name, rank=1)  # only rank 0 reports
        for step in range(1, 8):
            reporter.update(step, {"loss": f"{1 / step:.3g}"})
            other.update(100)
        reporter.update(10, {"loss": "0.1"}, force=True)
        board = ray.get_actor(progress.actor_name)
        assert ray.get(board.read.remote()) == (10, {"loss": "0.1"})
    assert progress._bar.n == 10  # the last report is drawn when the job ends
    assert "loss=0.1" in str(progress._bar)
    # the board goes with the job; a reporter that cannot find one does nothing
    StepReporter(progress.actor_name, rank=0).update(3)
    StepReporter(None, rank=0).update(3)
