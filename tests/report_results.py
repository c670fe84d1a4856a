"""Test-only: a small synthetic evaluation results folder (CONTRACTS.md, "Evaluation results folder").

:func:`make_results` writes what the evaluation would: ``summary.json`` with metrics (one deliberately
unavailable), ``objects.csv``, an image grid per object (:func:`geco.images.labeled_grid`), a GIF turntable
per (object, model), a real 3DGS ``.ply`` per (object, model) written by :func:`geco.export.save_ply` from
random Gaussians (a coloured blob inside [-0.5, 0.5]^3, so a viewer draws something), and a metric plot.
Metric values come from a seeded generator: tests read them back from ``summary.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from geco.export import save_ply
from geco.images import labeled_grid

METRICS = ("psnr", "ssim", "lpips", "cd", "viou", "fscore", "seconds_generate", "seconds_reconstruct")
VIEW_SETS = ("zero123", "orbit")


def random_gaussians(seed: int, n: int = 600) -> dict[str, np.ndarray]:
    """A blob of ``n`` coloured Gaussians inside [-0.4, 0.4]^3 (activated: the form save_ply takes)."""
    rng = np.random.default_rng(seed)
    return {
        "means": rng.uniform(-0.4, 0.4, (n, 3)),
        "quats": rng.normal(size=(n, 4)),
        "scales": rng.uniform(0.02, 0.06, (n, 3)),
        "opacities": rng.uniform(0.6, 0.95, n),
        "colors_rgb_or_sh": rng.uniform(0, 1, (n, 3)),
    }


def _metric_values(rng: np.random.Generator) -> dict[str, float]:
    return {
        "psnr": float(rng.uniform(12, 22)), "ssim": float(rng.uniform(0.6, 0.9)),
        "lpips": float(rng.uniform(0.1, 0.3)), "cd": float(rng.uniform(0.02, 0.08)),
        "viou": float(rng.uniform(0.3, 0.7)), "fscore": float(rng.uniform(0.3, 0.9)),
        "seconds_generate": float(rng.uniform(0.1, 5)), "seconds_reconstruct": float(rng.uniform(0.05, 0.5)),
    }


def make_results(root: Path, objects=("alarm", "teapot"), models=("teacher", "teacher_1step", "stage1"),
                 leakage: dict | None = None, unavailable_metric: str | None = "lpips", seed: int = 0,
                 tile: int = 24) -> Path:
    """Write a results folder under ``root`` and return it. ``leakage``: the summary's leakage entry
    (default: clean); ``unavailable_metric``: a metric set to null for every model, with a reason."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows, per = [], {m: {vs: [] for vs in VIEW_SETS} for m in models}
    for obj in objects:
        for model in models:
            for vs in VIEW_SETS:
                values = _metric_values(rng)
                if unavailable_metric:
                    values[unavailable_metric] = None
                per[model][vs].append(values)
                rows.append({"object": obj, "model": model, "view_set": vs,
                             **{k: "" if v is None else repr(v) for k, v in values.items()}})
    with (root / "objects.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["object", "model", "view_set", *METRICS])
        w.writeheader()
        w.writerows(rows)

    metrics = {}
    for model in models:
        metrics[model] = {}
        for vs in VIEW_SETS:
            for k in METRICS:
                vals = [r[k] for r in per[model][vs]]
                metrics[model][f"gso/{vs}/{k}"] = None if None in vals else float(np.mean(vals))
    summary = {
        "objects": list(objects), "models": list(models), "view_sets": list(VIEW_SETS), "metrics": metrics,
        "unavailable": {unavailable_metric: "no AlexNet weights load here (offline)"} if unavailable_metric else {},
        "leakage": leakage if leakage is not None else {"clean": True, "detail": "0 of 2 names, 0 hashes in training"},
        "scale": {"objects": len(objects), "resolution": tile},
        "seconds": 12.5,
        "lineage": {"git_commit": "0123abcd", "config_hash": "cafe1234",
                    "checkpoints": {m: f"outputs/{m}/bundle" for m in models}},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    for i, obj in enumerate(objects):
        pictures = [rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8) for _ in range(2 + len(models))]
        grid = labeled_grid([pictures], ["input", "ground truth", *models], min_tile=48)
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(grid).save(root / "images" / f"{obj}.png")
        for j, model in enumerate(models):
            frames = [Image.fromarray(rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8)) for _ in range(4)]
            (root / "turntables" / obj).mkdir(parents=True, exist_ok=True)
            frames[0].save(root / "turntables" / obj / f"{model}.gif", save_all=True, append_images=frames[1:],
                           duration=100, loop=0)
            (root / "ply" / obj).mkdir(parents=True, exist_ok=True)
            save_ply(root / "ply" / obj / f"{model}.ply", **random_gaussians(seed * 1000 + i * 10 + j))
    (root / "plots").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(root / "plots" / "metrics.png")
    return root
