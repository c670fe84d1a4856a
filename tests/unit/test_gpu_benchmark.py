"""benchmarks/gpu.py's CPU path: the GPU checks' logic at tiny size, the GPU-only parts as visible
"skipped" rows, the rasterizer parity measured (torch path float32 vs float64), a JSON in --out.
Also its robustness: a failing check is a FAILED row, a check past the global deadline a skipped row."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import gpu

ROW_KEYS = {"case", "value", "unit", "baseline", "ratio", "target", "meets_target"}


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the paper-size path (python -m benchmarks gpu)")
    out = tmp_path_factory.mktemp("gpu-bench")
    gpu.main(["--quick", "--out", str(out)])
    return json.loads((out / "gpu.json").read_text())


def _rows(res, *words):
    return [r for r in res["rows"] if all(w in r["case"] for w in words)]


def test_rows_follow_the_benchmarks_convention(cpu_result):
    assert cpu_result["benchmark"] == "gpu"
    assert cpu_result["rows"] and all(set(r) == ROW_KEYS for r in cpu_result["rows"])
    assert not _rows(cpu_result, "FAILED"), [r["case"] for r in _rows(cpu_result, "FAILED")]


def test_gpu_only_parts_are_visible_skips(cpu_result):
    for words in (("inference float16", "skipped: no CUDA"), ("inference bfloat16", "skipped: no CUDA"),
                  ("gsplat CUDA vs torch path", "skipped: no CUDA"), ("torch.compile", "skipped: no CUDA"),
                  ("stage-2 peak GPU memory", "skipped: no CUDA")):
        [r] = _rows(cpu_result, *words)
        assert r["value"] is None


def test_parity_rows_are_measured_and_within_tolerance(cpu_result):
    fwd = _rows(cpu_result, "torch path float32 vs float64", "forward")
    grads = _rows(cpu_result, "torch path float32 vs float64", "relative L2 error")
    assert len(fwd) == 1 and len(grads) == 5
    for r in fwd + grads:
        assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] > 0  # measured, not a stub
        assert r["meets_target"] is True, r


def test_inference_and_stage1_logic_ran_at_tiny_size(cpu_result):
    [one] = _rows(cpu_result, "cpu tiny float32", "one-step generator + reconstructor")
    [teacher] = _rows(cpu_result, "teacher 75 steps", "EXTRAPOLATED")
    assert one["value"] > 0 and teacher["value"] > 0 and teacher["baseline"] == one["value"]
    [raster] = _rows(cpu_result, "rasterization (torch path)")
    [total] = _rows(cpu_result, "cpu tiny float32", "+ rasterization")
    assert raster["value"] > 0 and total["value"] == pytest.approx(one["value"] + raster["value"], rel=1e-3)
    for mode in ("full", "lora"):
        [step] = _rows(cpu_result, f"stage-1 step, fake score {mode}", "s/step")
        assert step["value"] > 0
        d = cpu_result["details"][f"stage1_{mode}"]
        assert d["estimate_gib"]["total"] > 0 and math.isfinite(d["metrics_step2"]["loss_generator"])
    assert cpu_result["details"]["stage1_full"]["settings"]["fake_loss"] == "eps"  # configs/paper.yaml's stage1


def test_stage2_and_pseudo_gt_logic_ran_at_tiny_size(cpu_result):
    """The stage-2 step and the pseudo-GT arms run (paper.yaml's settings, tiny models): measured rows,
    a finite loss, the batched teacher compared with one object in the same run."""
    [step] = _rows(cpu_result, "stage-2 step", "s/step")
    assert step["value"] > 0 and "LPIPS left out" in step["case"]
    assert math.isfinite(cpu_result["details"]["stage2"]["metrics"]["loss"])
    [batched] = _rows(cpu_result, "pseudo-GT teacher 75 DDIM steps", "2 objects a batch")
    [single] = _rows(cpu_result, "pseudo-GT teacher 75 DDIM steps", "one object at a time")
    assert batched["baseline"] == single["value"] > 0 and batched["ratio"] == pytest.approx(
        single["value"] / batched["value"], rel=1e-3)
    [render] = _rows(cpu_result, "pseudo-GT 50 views", "rendered")
    assert render["value"] > 0


def test_a_failing_check_is_a_row_and_the_deadline_skips_visibly(tmp_path):
    def boom(run):
        raise RuntimeError("broken on purpose")

    run = gpu.Run(device=torch.device("cpu"), paper=False, quick=True, deadline=time.monotonic() + 600,
                  out=str(tmp_path))
    gpu.run_checks(run, [("boom", boom, 5.0), ("fine", lambda r: r.rows.append(gpu.row("fine", 1.0, "s")), 5.0)])
    assert [r["case"] for r in run.rows] == ["cpu tiny: boom - FAILED: RuntimeError: broken on purpose", "fine"]
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == run.rows  # saved after every check

    late = gpu.Run(device=torch.device("cpu"), paper=False, quick=True, deadline=time.monotonic() + 1,
                   out=str(tmp_path))
    gpu.run_checks(late, [("slow", lambda r: pytest.fail("must not start"), 5.0)])
    [r] = late.rows
    assert "slow - skipped: global deadline" in r["case"] and r["value"] is None


def test_a_check_past_its_budget_is_stopped(tmp_path):
    def spin(run):
        while True:
            time.sleep(0.05)

    run = gpu.Run(device=torch.device("cpu"), paper=True, quick=True, deadline=time.monotonic() + 600,
                  out=str(tmp_path))
    t0 = time.monotonic()
    gpu.run_checks(run, [("spin", spin, 1.0)])
    assert time.monotonic() - t0 < 10
    [r] = run.rows
    assert "spin - FAILED: CheckTimeout" in r["case"]


def test_only_the_named_checks_run(tmp_path):
    ran = []
    checks = [(name, lambda r, n=name: ran.append(n), 5.0) for name in ("inference float16", "stage2", "splat parity")]
    run = gpu.Run(device=torch.device("cpu"), paper=False, quick=True, deadline=time.monotonic() + 600,
                  out=str(tmp_path))
    gpu.run_checks(run, checks, only=["splat", "stage2"])
    assert ran == ["stage2", "splat parity"]


def test_a_misspelt_check_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(["--checks=splat,stage3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--checks: stage3 names no check" in err and "splat parity" in err, err


def test_a_check_waits_for_the_gsplat_build_and_names_its_failure(tmp_path):
    """A check that rasterizes on CUDA waits for the background build (a second, concurrent JIT build
    broke both on the H200) and a failed build is an error quoting its log."""
    log = tmp_path / "build.log"
    log.write_text("nvcc: fatal error on purpose\n")
    run = gpu.Run(device=torch.device("cpu"), paper=True, quick=True, deadline=time.monotonic() + 600,
                  out=str(tmp_path))
    run.gsplat_log, run.gsplat_build_t0 = str(log), time.monotonic()
    run.gsplat_build = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="exit 3.*fatal error on purpose"):
        gpu.await_gsplat(run)
    assert run.gsplat_build.returncode == 3 and run.details["gsplat_build_s"] >= 0.9


def test_option_values_are_not_benchmark_names(monkeypatch):
    """``python -m benchmarks gpu --deadline-s 300 --out DIR`` passes both values on to gpu's main."""
    seen = {}
    monkeypatch.setattr(gpu, "main", lambda opts: seen.setdefault("opts", opts))
    assert bench_main.main(["gpu", "--deadline-s", "300", "--out", "d", "--quick"]) == 0
    assert seen["opts"] == ["--deadline-s", "300", "--out", "d", "--quick"]
    assert bench_main.main(["gpu", "--quick", "gpu", "nonsense"]) == 2  # a misspelt name still stops the run
