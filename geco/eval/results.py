"""The evaluation's results folder (CONTRACTS.md "Evaluation results folder"), read by the report.

    <results>/
      summary.json   objects, models, view sets, aggregated metrics per model
                     ({"gso/<view set>/<metric>": float | null}; null = unavailable or no value),
                     "unavailable" {metric: reason}, "leakage", "scale", "seconds", "lineage", ...
      objects.csv    one row per (object, model, view set): the metrics of that object
      images/<object>.png               input | ground truth | each model; one row per view
      turntables/<object>/<model>.gif   the model's Gaussians around an orbit
      ply/<object>/<model>.ply          the model's Gaussians (standard 3DGS .ply)
      plots/metrics.png                 every metric, per model and view set

Aggregation (:func:`aggregate`): per object first (views averaged in
:func:`geco.eval.protocol.score_object`), then the mean over the objects that have a value
(NaN - e.g. a model that rendered no surface, so no Chamfer distance - is left out of the mean and
counted in ``summary["missing"]``). Geometry (cd, viou, fscore) and seconds are per object, not per
view set: each view set's row repeats them, so each view set reads as a complete table row.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from geco.export import save_ply
from geco.images import labeled_grid, to_uint8

CSV_COLUMNS = ("object", "model", "view_set", "psnr", "ssim", "lpips", "cd", "viou", "fscore",
               "seconds_generate", "seconds_reconstruct")
METRICS = CSV_COLUMNS[3:]

__all__ = ["CSV_COLUMNS", "METRICS", "ResultsWriter", "aggregate", "object_grid", "rows_for"]


def _num(v: Any) -> float | None:
    """A JSON-able metric value: None for missing, NaN or inf."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def rows_for(obj: str, model: str, scores: Mapping[str, Mapping], seconds: Mapping[str, float],
             view_sets: Sequence[str]) -> list[dict]:
    """The objects.csv rows of one (object, model): one per view set; extra geometry keys
    (``fscore_<t>``) are kept beside the contract's columns."""
    geo = scores.get("geometry", {})
    rows = []
    for vs in view_sets:
        row = {"object": obj, "model": model, "view_set": vs}
        row.update({k: _num(scores.get(vs, {}).get(k)) for k in ("psnr", "ssim", "lpips")})
        row.update({k: _num(v) for k, v in geo.items()})
        row.update({k: _num(seconds.get(k)) for k in ("seconds_generate", "seconds_reconstruct")})
        rows.append(row)
    return rows


def aggregate(rows: Iterable[Mapping], models: Sequence[str], view_sets: Sequence[str]) -> tuple[dict, dict]:
    """``({model: {"gso/<view set>/<metric>": mean | None}}, {model: {key: objects without a value}})``."""
    rows = list(rows)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("object", "model", "view_set")]
    out: dict[str, dict[str, float | None]] = {}
    missing: dict[str, dict[str, int]] = {}
    for m in models:
        out[m], missing[m] = {}, {}
        for vs in view_sets:
            sel = [r for r in rows if r["model"] == m and r["view_set"] == vs]
            for k in keys:
                vals = [r.get(k) for r in sel]
                good = [v for v in vals if v is not None]
                out[m][f"gso/{vs}/{k}"] = float(np.mean(good)) if good else None
                if sel and len(good) < len(vals):
                    missing[m][f"gso/{vs}/{k}"] = len(vals) - len(good)
    return out, {m: v for m, v in missing.items() if v}


def object_grid(input_rgb, gt: Mapping[str, Any], preds: Mapping[str, Mapping[str, Any]],
                view_sets: Sequence[str]) -> np.ndarray:
    """input | ground truth | each model: one row per view of each view set (the input in the first
    row only). Tensors [3, H, W] / [V, 3, H, W] in [0, 1]; views are resized to one size by the grid."""
    models = list(preds)
    labels = ["input", "ground truth", *models]
    size = next(iter(gt.values())).shape[-1]
    from torch.nn.functional import interpolate

    inp = interpolate(input_rgb[None].float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)[0]
    blank = np.full((size, size, 3), 255, np.uint8)
    rows = []
    for vs in view_sets:
        for i in range(len(gt[vs])):
            first = not rows
            rows.append([to_uint8(inp) if first else blank, to_uint8(gt[vs][i])]
                        + [to_uint8(preds[m][vs][i]) for m in models])
    return labeled_grid(rows, labels, min_tile=96)


class ResultsWriter:
    """Writes one results folder (module docstring); the per-object files as objects finish."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add_object(self, obj: str, grid: np.ndarray | None = None, plys: Mapping[str, Any] | None = None,
                   turntables: Mapping[str, Sequence[np.ndarray]] | None = None) -> None:
        if grid is not None:
            (self.root / "images").mkdir(exist_ok=True)
            Image.fromarray(grid).save(self.root / "images" / f"{obj}.png")
        for model, g in (plys or {}).items():
            d = self.root / "ply" / obj
            d.mkdir(parents=True, exist_ok=True)
            save_ply(d / f"{model}.ply", g.means, g.quats, g.scales, g.opacities, g.rgb)
        for model, frames in (turntables or {}).items():
            if not frames:
                continue
            d = self.root / "turntables" / obj
            d.mkdir(parents=True, exist_ok=True)
            imgs = [Image.fromarray(f) for f in frames]
            imgs[0].save(d / f"{model}.gif", save_all=True, append_images=imgs[1:],
                         duration=max(20, 2000 // len(imgs)), loop=0, disposal=2)

    def finish(self, rows: Sequence[Mapping], summary: Mapping[str, Any], plot: bool = True) -> None:
        """objects.csv, plots/metrics.png, then summary.json (written last: its presence means done)."""
        extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in CSV_COLUMNS]
        with open(self.root / "objects.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*CSV_COLUMNS, *extra], restval="")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        if plot:
            self.plot(summary)
        tmp = self.root / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
        tmp.replace(self.root / "summary.json")

    def plot(self, summary: Mapping[str, Any]) -> Path:
        """plots/metrics.png: one panel per metric, a bar per (model, view set)."""
        import matplotlib  # lazy: matplotlib takes a second to import and only this needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models, view_sets = list(summary["models"]), list(summary["view_sets"])
        metrics = [m for m in METRICS if any(summary["metrics"][mo].get(f"gso/{vs}/{m}") is not None
                                             for mo in models for vs in view_sets)]
        n = max(1, len(metrics))
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.2), squeeze=False)
        width = 0.8 / max(1, len(view_sets))
        for ax, metric in zip(axes[0], metrics):
            for j, vs in enumerate(view_sets):
                vals = [summary["metrics"][mo].get(f"gso/{vs}/{metric}") for mo in models]
                ax.bar(np.arange(len(models)) + j * width, [np.nan if v is None else v for v in vals], width, label=vs)
            ax.set_title(metric, fontsize=9)
            ax.set_xticks(np.arange(len(models)) + width * (len(view_sets) - 1) / 2)
            ax.set_xticklabels(models, rotation=45, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        if metrics:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        out = self.root / "plots" / "metrics.png"
        out.parent.mkdir(exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
