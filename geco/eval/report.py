"""The evaluation report: one self-contained page (and a Markdown twin) from an evaluation results folder.

:func:`write_report` reads the results folder the evaluation writes (CONTRACTS.md, "Evaluation results
folder": ``summary.json``, ``objects.csv``, ``images/``, ``turntables/``, ``ply/``, ``plots/``) and writes
``<results>/report/``:

    index.html                  the page (inline CSS, no network: every file it uses sits beside it)
    report.md                   the same tables in Markdown
    objects.csv                 the per-object rows, linked from both
    images/ turntables/ plots/  copies of the results' pictures (so report/ alone can be shared or
                                logged as one artifact folder)
    splats/<object>/<model>.js  each generated .ply as a "sidecar" script for the viewer (below)
    viewer/geco-viewer.js       the 3D viewer, copied from the viewer's build

What the page shows:

* the paper's Table 1 (GSO main table) and its ablation ("Table 2") with our rows beside the paper's;
  the paper's numbers live in :data:`PAPER_TABLE1` and :data:`PAPER_ABLATION`, with their source in
  :data:`PAPER_SOURCE` (and nowhere else);
* the leakage check: clean only when ``summary["leakage"]["clean"]`` is ``true``; a leaking evaluation
  (or one whose check is missing) is marked in red at the top, in the title and in every table caption,
  never shown as clean;
* metrics the evaluation could not compute (``null``) as "n/a" with the reason from ``unavailable``;
* ``summary["notes"]`` when present (optional, a string or a list of strings, beyond CONTRACTS.md): how
  the numbers are made, e.g. how Gaussians become depth maps and occupancy for CD and vIoU;
* per object: the image grid (input | ground truth | each model), each model's turntable, the
  per-object table (from ``objects.csv``, also linked as CSV), the metric plot(s);
* an interactive 3D viewer of every generated .ply, the GSO attribution (CC BY 4.0, Google LLC) and
  the lineage (commit, config hash, checkpoints...).

The viewer is Spark (``@sparkjsdev/spark``, MIT) on three.js (MIT), bundled by esbuild into one classic
script: ``geco/eval/viewer`` holds its package.json/package-lock.json and entry; ``make install`` runs
``npm ci`` and the build (``node_modules/`` and ``dist/`` stay out of git). A browser blocks module scripts
and ``fetch()`` on file:// pages but not classic ``<script src>``, so the bundle and each model's Gaussians
(the .ply's bytes, base64, in ``splats/<object>/<model>.js``, loaded only when a person picks that model)
are classic scripts: the page works opened as a file and from any static server. Spark's worker and
WebAssembly are inlined in the bundle (no SharedArrayBuffer, so no cross-origin-isolation headers). When
the bundle is not built the page is still written, and its viewer section says how to build it.

Numbers are printed with a fixed number of decimals per metric (:data:`DECIMALS`); each table cell also
carries the exact value in ``data-value``. Only the standard library is used here (no torch): ``geco
report`` re-writes a page in well under a second.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = [
    "DECIMALS", "MODEL_LABELS", "PAPER_ABLATION", "PAPER_SOURCE", "PAPER_TABLE1", "VIEWER_BUNDLE", "VIEW_SETS",
    "PaperRow", "ReportError", "format_metric", "write_report",
]

log = logging.getLogger(__name__)

REPORT_DIR = "report"
VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
VIEWER_BUNDLE = VIEWER_DIR / "dist" / "geco-viewer.js"  # built by `make install` (npm ci + esbuild)

VIEW_SETS = {"zero123": "the 6 Zero123++ views", "orbit": "15 views around the object at elevation 0°"}
METRICS = ("psnr", "ssim", "lpips", "cd", "viou", "fscore", "seconds_generate", "seconds_reconstruct")
METRIC_LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "cd": "CD ↓", "viou": "vIoU ↑",
                 "fscore": "F-score ↑", "seconds_generate": "s generate", "seconds_reconstruct": "s reconstruct",
                 "seconds": "s to 3D ↓"}
DECIMALS = {"psnr": 2, "ssim": 3, "lpips": 3, "cd": 4, "viou": 3, "fscore": 3, "seconds_generate": 3,
            "seconds_reconstruct": 3, "seconds": 2}
MODEL_LABELS = {
    "teacher": "Teacher (multi-step) + reconstructor",
    "teacher_1step": "Teacher, 1 step + reconstructor",
    "stage1": "GECO, stage 1 only",
    "stage2": "GECO, stage 1 + 2",
}

# ---- the paper's numbers: the only place they are written down --------------------------------------
PAPER_CITATION = "arXiv 2405.20327 v2"
PAPER_DECIMALS = {**DECIMALS, "cd": 3}  # as the paper prints them (ours get a 4th decimal: CD is small)
PAPER_SOURCE = ("GECO: Generative Image-to-3D within a SECOnd, arXiv 2405.20327 v2 (Aug 2024): Table 1 "
                "(Google Scanned Objects, SyncDreamer's 30 objects; time to 3D on one L40) and the ablation "
                "(PSNR). The paper does not report an F-score.")


@dataclass(frozen=True)
class PaperRow:
    method: str
    metrics: dict[str, float]  # psnr, ssim, lpips, cd, viou, seconds (time to 3D)
    note: str = ""


PAPER_TABLE1: tuple[PaperRow, ...] = (
    PaperRow("TriplaneGaussian", {"psnr": 18.52, "ssim": 0.817, "lpips": 0.191, "cd": 0.036, "viou": 0.492,
                                  "seconds": 0.11}, "+140 s to a mesh"),
    PaperRow("OpenLRM", {"psnr": 18.15, "ssim": 0.810, "lpips": 0.173, "cd": 0.035, "viou": 0.557, "seconds": 0.22}),
    PaperRow("TripoSR", {"psnr": 18.33, "ssim": 0.812, "lpips": 0.172, "cd": 0.033, "viou": 0.577, "seconds": 0.16}),
    PaperRow("LGM", {"psnr": 18.11, "ssim": 0.805, "lpips": 0.178, "cd": 0.038, "viou": 0.478, "seconds": 1.28}),
    PaperRow("InstantMesh (the teacher, 75 steps)", {"psnr": 19.15, "ssim": 0.822, "lpips": 0.152, "cd": 0.028,
                                                     "viou": 0.626, "seconds": 7.06}),
    PaperRow("GECO", {"psnr": 19.31, "ssim": 0.825, "lpips": 0.154, "cd": 0.029, "viou": 0.599, "seconds": 0.34},
             "0.64 s with a mesh"),
)

# (variant as the paper names it, the paper's PSNR, our model that plays that part)
PAPER_ABLATION: tuple[tuple[str, float, str], ...] = (
    ("Teacher, 1 step, no distillation", 14.79, "teacher_1step"),
    ("GECO without stage 2", 18.75, "stage1"),
    ("GECO (stage 1 + stage 2)", 19.30, "stage2"),
    ("Teacher, 75 steps (Table 1)", 19.15, "teacher"),
)

GSO_ATTRIBUTION = ("Evaluation objects: Google Scanned Objects by Google LLC, licensed under CC BY 4.0 "
                   "(https://creativecommons.org/licenses/by/4.0/); Downie et al., “Google Scanned Objects: A "
                   "High-Quality Dataset of 3D Scanned Household Items”, ICRA 2022. The renders, images and "
                   "Gaussians in this report are derived from those objects.")
VIEWER_CREDIT = "3D viewer: Spark (@sparkjsdev/spark, MIT licence) on three.js (MIT licence)."


class ReportError(ValueError):
    """A results folder the report cannot be made from (missing, or its summary.json is not readable)."""


def format_metric(metric: str, value: Any, decimals: dict[str, int] = DECIMALS) -> str:
    """A metric value as the report prints it: fixed decimals per metric, "n/a" for a missing value."""
    if value is None or value == "":
        return "n/a"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "n/a"
    return f"{x:.{decimals.get(metric, 3)}f}"


# ---- reading the results folder -----------------------------------------------------------------------

def _safe_name(kind: str, name: Any) -> str:
    """An object or model name is used as a file name: refuse anything that could leave its folder."""
    text = str(name)
    if not text or text.startswith(".") or any(c in text for c in "/\\\0"):
        raise ReportError(f"summary.json: {kind} name {text!r} cannot be a file name (no '/', '\\' or leading '.')")
    return text


def _read_summary(results: Path) -> dict:
    path = results / "summary.json"
    if not results.is_dir():
        raise ReportError(f"{results}: no such results folder (give the folder the evaluation wrote)")
    if not path.is_file():
        raise ReportError(f"{path}: not found; is {results} an evaluation results folder?")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key, kind in (("objects", list), ("models", list), ("metrics", dict)):
        if not isinstance(summary.get(key), kind):
            raise ReportError(f"{path}: {key!r} must be a {kind.__name__} (see the evaluation's summary format)")
    summary["objects"] = [_safe_name("object", o) for o in summary["objects"]]
    summary["models"] = [_safe_name("model", m) for m in summary["models"]]
    return summary


def _read_objects_csv(results: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = results / "objects.csv"
    if not path.is_file():
        return [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _metric(summary: dict, model: str, view_set: str, metric: str) -> float | None:
    value = (summary["metrics"].get(model) or {}).get(f"gso/{view_set}/{metric}")
    return None if value is None else float(value)


def _seconds_to_3d(summary: dict, model: str, view_set: str) -> float | None:
    gen = _metric(summary, model, view_set, "seconds_generate")
    rec = _metric(summary, model, view_set, "seconds_reconstruct")
    return None if gen is None or rec is None else gen + rec


def _view_sets(summary: dict) -> list[str]:
    return [str(v) for v in summary.get("view_sets") or VIEW_SETS]


def _leakage(summary: dict) -> tuple[bool, str]:
    """(clean, what to say). Clean only when the check ran, said ``true`` and lists no leaked name or hash."""
    leak = summary.get("leakage")
    if not isinstance(leak, dict) or "clean" not in leak:
        return False, "The leakage check did not run: these numbers are NOT a verified clean evaluation."
    detail = str(leak.get("detail") or "").strip()
    names, hashes = list(leak.get("names") or []), list(leak.get("hashes") or [])
    if leak["clean"] is True and not names and not hashes:
        return True, "Leakage check: clean. No evaluation object is in the training data" + (
            f" ({detail})." if detail else ".")
    found = "; ".join(part for part in (
        f"Names in the training data: {', '.join(map(str, names))}" if names else "",
        f"{len(hashes)} content hash(es) in the training data" if hashes else "") if part)
    return False, ("LEAKING EVALUATION: evaluation objects are in the training data, so these numbers are NOT a "
                   "clean evaluation." + "".join(f" {t}." for t in (found, detail.rstrip(".")) if t))


def _label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


# ---- the tables, as rows of cells (shared by HTML and Markdown) ---------------------------------------

@dataclass
class Cell:
    text: str
    value: float | None = None  # the exact number behind a metric cell
    metric: str | None = None
    title: str = ""  # a tooltip (e.g. why a value is unavailable)


@dataclass
class Table:
    caption: str
    header: list[str]
    groups: list[tuple[str, list[list[Cell]]]]  # (group title or "", rows)
    note: str = ""


def _metric_cell(metric: str, value: float | None, unavailable: dict) -> Cell:
    title = "" if value is not None else str(unavailable.get(metric) or "not computed")
    return Cell(format_metric(metric, value), value, metric, title)


TABLE1_METRICS = ("psnr", "ssim", "lpips", "cd", "viou", "fscore", "seconds")


def _table1(summary: dict, leak_mark: str) -> Table:
    unavailable = summary.get("unavailable") or {}
    header = ["Method"] + [METRIC_LABELS[m] for m in TABLE1_METRICS]
    paper_rows = []
    for row in PAPER_TABLE1:
        name = row.method + (f" ({row.note})" if row.note else "")
        paper_rows.append([Cell(name)] + [
            Cell(format_metric(m, row.metrics[m], PAPER_DECIMALS) if m in row.metrics else "—", row.metrics.get(m), m)
            for m in TABLE1_METRICS])
    groups = [("Paper", paper_rows)]
    for vs in _view_sets(summary):
        rows = []
        for model in summary["models"]:
            cells = [Cell(_label(model))]
            for m in TABLE1_METRICS:
                v = _seconds_to_3d(summary, model, vs) if m == "seconds" else _metric(summary, model, vs, m)
                cells.append(_metric_cell(m, v, unavailable))
            rows.append(cells)
        groups.append((f"Ours{leak_mark}: {VIEW_SETS.get(vs, vs)} ({vs})", rows))
    return Table(f"Table 1: image-to-3D on Google Scanned Objects{leak_mark}", header, groups,
                 "Paper rows: " + PAPER_SOURCE + " Ours: time to 3D = generation + reconstruction seconds per "
                 "object on this run's hardware (see Scale).")


def _table2(summary: dict, leak_mark: str) -> Table:
    unavailable = summary.get("unavailable") or {}
    vss = _view_sets(summary)
    header = ["Variant", "Paper PSNR ↑", "Our model"] + [
        f"{METRIC_LABELS[m]} ({vs})" for vs in vss for m in ("psnr", "ssim", "lpips")]
    rows = []
    for variant, paper_psnr, model in PAPER_ABLATION:
        ours = model in summary["models"]
        cells = [Cell(variant), Cell(format_metric("psnr", paper_psnr), paper_psnr, "psnr"),
                 Cell(_label(model) if ours else f"{_label(model)} (not evaluated)")]
        for vs in vss:
            for m in ("psnr", "ssim", "lpips"):
                cells.append(_metric_cell(m, _metric(summary, model, vs, m), unavailable) if ours else Cell("—"))
        rows.append(cells)
    return Table(f"Table 2: ablation{leak_mark}", header, [("", rows)],
                 f"Paper column: the ablation in {PAPER_CITATION} (PSNR only; its 75-step teacher row is Table 1's).")


def _objects_table(fields: list[str], rows: list[dict[str, str]]) -> Table:
    body = []
    for r in rows:
        cells = []
        for f in fields:
            raw = r.get(f)
            if f in DECIMALS:
                try:
                    value = None if raw in (None, "") else float(raw)
                except ValueError:
                    value = None
                cells.append(Cell(format_metric(f, value), value, f))
            else:
                cells.append(Cell(str(raw or "")))
        body.append(cells)
    return Table("Per object", [METRIC_LABELS.get(f, f) for f in fields], [("", body)])


# ---- HTML ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;line-height:1.4}
h1{margin-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.92em}
caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ccc;padding:.25em .55em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:#999}
tr.group th{background:#eef2f7;text-align:left}
thead th{background:#f6f6f6}
.note{color:#555;font-size:.88em}
.banner{padding:.7em 1em;border-radius:4px;font-weight:600;margin:1em 0}
.clean{background:#e6f4ea;border:1px solid #34a853;color:#1e6b34}
.leak{background:#fdecea;border:2px solid #d93025;color:#a50e0e}
.leakmark{color:#d93025}
.viewer{width:480px;height:480px;border:1px solid #ccc;background:#fff}
.viewer-picks button{margin:.15em;padding:.25em .6em;border:1px solid #aaa;background:#fafafa;border-radius:3px;
cursor:pointer}
.viewer-picks button.active{background:#1a73e8;color:#fff;border-color:#1a73e8}
.turntables{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}
figcaption{font-size:.85em;color:#444}
img.grid{max-width:100%}
img.turntable{width:192px;image-rendering:pixelated}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}
dl.kv dt{font-weight:600}
dl.kv dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(*parts: str) -> str:
    """A relative URL from path parts (each percent-encoded)."""
    return "/".join(quote(p) for p in parts)


def _html_table(t: Table, table_id: str) -> str:
    out = [f'<table id="{table_id}"><caption>{_e(t.caption)}</caption>',
           "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in t.header) + "</tr></thead><tbody>"]
    for title, rows in t.groups:
        if title:
            out.append(f'<tr class="group"><th colspan="{len(t.header)}">{_e(title)}</th></tr>')
        for cells in rows:
            tds = []
            for c in cells:
                attrs = []
                if c.metric is not None:
                    attrs.append(f'data-metric="{_e(c.metric)}"')
                    classes = "num" + (" na" if c.value is None else "")
                    attrs.append(f'class="{classes}"')
                    if c.value is not None:
                        attrs.append(f'data-value="{c.value!r}"')
                if c.title:
                    attrs.append(f'title="{_e(c.title)}"')
                tds.append(f"<td {' '.join(attrs)}>{_e(c.text)}</td>" if attrs else f"<td>{_e(c.text)}</td>")
            out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{_e(t.note)}</p>')
    return "\n".join(out)


def _kv(d: dict) -> str:
    items = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        items.append(f"<dt>{_e(k)}</dt><dd>{_e(text)}</dd>")
    return '<dl class="kv">' + "".join(items) + "</dl>"


@dataclass
class _Assets:
    """What was found in the results folder and copied into the report (paths relative to report/)."""
    grids: dict[str, str]
    turntables: dict[str, dict[str, str]]
    splats: dict[str, dict[str, str]]  # object -> model -> sidecar script
    plys: dict[str, dict[str, str]]  # object -> model -> the .ply in the results folder (relative to report/)
    plots: list[str]
    csv: str | None
    viewer: str | None


def _copy(src: Path, out: Path, *rel: str) -> str:
    dest = out.joinpath(*rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return _href(*rel)


def _write_sidecar(ply: Path, out: Path, obj: str, model: str) -> str:
    rel = ("splats", obj, f"{model}.js")
    dest = out.joinpath(*rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    key = json.dumps(f"{obj}/{model}")
    data = base64.b64encode(ply.read_bytes()).decode("ascii")
    dest.write_text(f'(window.GecoSplats = window.GecoSplats || {{}})[{key}] = "{data}";\n', encoding="ascii")
    return _href(*rel)


def _collect_assets(results: Path, out: Path, summary: dict) -> _Assets:
    grids, turntables, splats, plys = {}, {}, {}, {}
    for obj in summary["objects"]:
        grid = results / "images" / f"{obj}.png"
        if grid.is_file():
            grids[obj] = _copy(grid, out, "images", f"{obj}.png")
        for model in summary["models"]:
            for ext in ("gif", "png"):
                tt = results / "turntables" / obj / f"{model}.{ext}"
                if tt.is_file():
                    turntables.setdefault(obj, {})[model] = _copy(tt, out, "turntables", obj, f"{model}.{ext}")
                    break
            ply = results / "ply" / obj / f"{model}.ply"
            if ply.is_file():
                splats.setdefault(obj, {})[model] = _write_sidecar(ply, out, obj, model)
                plys.setdefault(obj, {})[model] = _href("..", "ply", obj, f"{model}.ply")
    plots = [_copy(p, out, "plots", p.name) for p in sorted((results / "plots").glob("*.png"))]
    csv_rel = _copy(results / "objects.csv", out, "objects.csv") if (results / "objects.csv").is_file() else None
    viewer = None
    if VIEWER_BUNDLE.is_file():
        viewer = _copy(VIEWER_BUNDLE, out, "viewer", VIEWER_BUNDLE.name)
    elif splats:
        log.warning("the report's 3D viewer is not built (%s missing): run `make install` (npm ci + build in %s); "
                    "the page is written without it", VIEWER_BUNDLE, VIEWER_DIR)
    return _Assets(grids, turntables, splats, plys, plots, csv_rel, viewer)


def _viewer_section(summary: dict, a: _Assets) -> str:
    if not a.splats:
        return "<p>No generated Gaussians (.ply) in the results folder.</p>"
    picks = []
    for obj in summary["objects"]:
        buttons = "".join(
            f'<button type="button" data-splat-key="{_e(obj + "/" + m)}" data-splat-src="{_e(src)}">{_e(m)}</button>'
            for m, src in a.splats.get(obj, {}).items())
        if buttons:
            picks.append(f"<div><strong>{_e(obj)}</strong>: {buttons}</div>")
    if a.viewer is None:
        viewer = (f'<p class="banner leak">The 3D viewer is not built: run <code>make install</code> (it runs '
                  f"<code>npm ci</code> and the build in {_e(VIEWER_DIR.name)}/), then <code>geco report "
                  f"RESULTS_DIR</code>. The .ply files are linked below each object.</p>")
        return viewer
    return (
        '<p class="note">Pick a model; drag to orbit, scroll to zoom, right-drag to pan. ' + _e(VIEWER_CREDIT) + "</p>"
        f'<div class="viewer-picks">{"".join(picks)}</div>'
        '<div id="viewer" class="viewer" data-state="idle"></div><p id="viewer-status" class="note"></p>'
        f'<script src="{_e(a.viewer)}"></script>'
        "<script>(function(){var status=document.getElementById('viewer-status');"
        "if(!window.GecoViewer){status.textContent='the 3D viewer script did not load';"
        "console.error('GECO viewer: the viewer script did not load');return;}"
        "try{GecoViewer.start(document.getElementById('viewer'),{status:status});}"
        "catch(e){status.textContent='the 3D viewer cannot start here: '+e;"
        "console.error('GECO viewer: cannot start:',e);}})();</script>")


def _objects_section(summary: dict, a: _Assets) -> str:
    out = []
    for obj in summary["objects"]:
        out.append(f'<section class="object" id="object-{_e(obj)}"><h3>{_e(obj)}</h3>')
        if obj in a.grids:
            out.append(f'<img class="grid" src="{_e(a.grids[obj])}" alt="{_e(obj)}: input, ground truth and each '
                       'model\'s views">')
        tts = a.turntables.get(obj, {})
        if tts:
            figs = "".join(f'<figure><img class="turntable" src="{_e(src)}" alt="{_e(obj)} {_e(m)} turntable">'
                           f"<figcaption>{_e(_label(m))}</figcaption></figure>" for m, src in tts.items())
            out.append(f'<div class="turntables">{figs}</div>')
        plys = a.plys.get(obj, {})
        if plys:
            links = ", ".join(f'<a href="{_e(src)}">{_e(m)}.ply</a>' for m, src in plys.items())
            out.append(f'<p class="note">Gaussians (standard 3DGS .ply, in the results folder): {links}</p>')
        out.append("</section>")
    return "\n".join(out)


def _html(summary: dict, a: _Assets, t1: Table, t2: Table, objects: Table, clean: bool, leak_text: str) -> str:
    title = ("" if clean else "[NOT CLEAN] ") + "GECO evaluation on Google Scanned Objects"
    unavailable = summary.get("unavailable") or {}
    notes = summary.get("notes")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request (a 404 on a static server)
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p id="leakage" class="banner {"clean" if clean else "leak"}" data-clean="{str(clean).lower()}">'
        f"{_e(leak_text)}</p>",
        f'<p class="note">{len(summary["objects"])} objects, models: '
        f'{_e(", ".join(summary["models"]) or "none")}; evaluation took '
        f'{_e(format_metric("seconds", summary.get("seconds")))} s.</p>',
        "<h2>Results</h2>", _html_table(t1, "table1"), _html_table(t2, "table2"),
    ]
    if unavailable:
        items = "".join(f"<li><strong>{_e(k)}</strong>: {_e(v)}</li>" for k, v in unavailable.items())
        parts.append(f'<h3>Unavailable metrics</h3><ul id="unavailable">{items}</ul>')
    if notes:
        items = notes if isinstance(notes, list) else [notes]
        parts.append("<h3>How the numbers are made</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in items) + "</ul>")
    for src in a.plots:
        parts.append(f'<figure><img class="grid" src="{_e(src)}" alt="metric plot">'
                     f"<figcaption>{_e(Path(src).stem)}</figcaption></figure>")
    parts += ["<h2>3D viewer</h2>", _viewer_section(summary, a),
              "<h2>Objects</h2>", _objects_section(summary, a),
              "<h2>Per-object metrics</h2>"]
    if a.csv:
        parts.append(f'<p><a href="{_e(a.csv)}">objects.csv</a> (one row per object, model and view set)</p>')
    parts.append(_html_table(objects, "objects") if objects.groups[0][1] else "<p>No objects.csv.</p>")
    if summary.get("scale"):
        parts += ["<h2>Scale</h2>", _kv(summary["scale"])]
    parts += ["<h2>Lineage</h2>", _kv(summary.get("lineage") or {"lineage": "not recorded"}),
              "<h2>Attribution</h2>", f'<p id="attribution">{_e(GSO_ATTRIBUTION)}</p>',
              f'<p class="note">{_e(VIEWER_CREDIT)} Paper numbers: {_e(PAPER_SOURCE)}</p>',
              "</body></html>"]
    return "\n".join(parts) + "\n"


# ---- Markdown -----------------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    lines = [f"**{_md_escape(t.caption)}**", "", "| " + " | ".join(map(_md_escape, t.header)) + " |",
             "|" + "---|" * len(t.header)]
    for title, rows in t.groups:
        if title:
            lines.append(f"| *{_md_escape(title)}* |" + " |" * (len(t.header) - 1))
        lines += ["| " + " | ".join(_md_escape(c.text) for c in cells) + " |" for cells in rows]
    if t.note:
        lines += ["", t.note]
    return lines + [""]


def _markdown(summary: dict, a: _Assets, t1: Table, t2: Table, objects: Table, clean: bool, leak_text: str) -> str:
    title = ("[NOT CLEAN] " if not clean else "") + "GECO evaluation on Google Scanned Objects"
    lines = [f"# {title}", "", f"**{leak_text}**" if clean else f"**⚠ {leak_text}**", "",
             f"{len(summary['objects'])} objects; models: {', '.join(summary['models']) or 'none'}; evaluation took "
             f"{format_metric('seconds', summary.get('seconds'))} s.", "", "## Results", ""]
    lines += _md_table(t1) + _md_table(t2)
    unavailable = summary.get("unavailable") or {}
    if unavailable:
        lines += ["Unavailable metrics:", ""] + [f"- **{k}**: {v}" for k, v in unavailable.items()] + [""]
    notes = summary.get("notes")
    if notes:
        lines += ["How the numbers are made:", ""] + [f"- {n}" for n in (notes if isinstance(notes, list) else [notes])]
        lines.append("")
    lines += [f"![metric plot]({src})" for src in a.plots] + [""]
    lines += ["## Objects", ""]
    for obj in summary["objects"]:
        lines.append(f"### {obj}")
        if obj in a.grids:
            lines.append(f"![{obj}]({a.grids[obj]})")
        for m, src in a.turntables.get(obj, {}).items():
            lines.append(f"![{obj} {m}]({src})")
        plys = a.plys.get(obj, {})
        if plys:
            lines.append("Gaussians: " + ", ".join(f"[{m}.ply]({src})" for m, src in plys.items()))
        lines.append("")
    lines += ["## Per-object metrics", ""]
    if a.csv:
        lines += [f"[objects.csv]({a.csv})", ""]
    lines += _md_table(objects)
    if summary.get("scale"):
        lines += ["## Scale", ""] + [f"- {k}: {v if isinstance(v, str) else json.dumps(v)}"
                                     for k, v in summary["scale"].items()] + [""]
    lineage = summary.get("lineage") or {"lineage": "not recorded"}
    lines += ["## Lineage", ""] + [f"- {k}: `{v if isinstance(v, str) else json.dumps(v, sort_keys=True)}`"
                                   for k, v in lineage.items()] + [""]
    lines += ["## Attribution", "", GSO_ATTRIBUTION, "", VIEWER_CREDIT, ""]
    return "\n".join(lines)


# ---- the entry point ----------------------------------------------------------------------------------

def write_report(results_dir: str | Path) -> Path:
    """Write ``<results_dir>/report/`` (index.html, report.md and the files they show) from an evaluation
    results folder; return the path of index.html. Re-writing replaces the earlier report whole.

    Raises :class:`ReportError` when ``results_dir`` is not a readable results folder."""
    results = Path(results_dir)
    summary = _read_summary(results)
    clean, leak_text = _leakage(summary)
    leak_mark = "" if clean else " [NOT CLEAN]"
    fields, rows = _read_objects_csv(results)

    final = results / REPORT_DIR
    staging = results / f".{REPORT_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        assets = _collect_assets(results, staging, summary)
        t1, t2, objects = _table1(summary, leak_mark), _table2(summary, leak_mark), _objects_table(fields, rows)
        (staging / "index.html").write_text(_html(summary, assets, t1, t2, objects, clean, leak_text),
                                            encoding="utf-8")
        (staging / "report.md").write_text(_markdown(summary, assets, t1, t2, objects, clean, leak_text),
                                           encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / "index.html"

