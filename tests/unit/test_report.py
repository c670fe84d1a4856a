"""geco.eval.report: the tables hold summary.json's numbers (beside the paper's), leakage is never shown
as clean unless the check said so, the page only uses files inside its folder, and ``geco report`` gives
one line for a folder it cannot use. The page in a real browser: tests/integration/test_report.py."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cli.main import main
from geco.eval import report
from geco.eval.report import ReportError, format_metric, write_report
from tests.report_results import METRICS, VIEW_SETS, make_results


class _Tables(HTMLParser):
    """Every <table id=...>: a list of rows; a row is ("group", title) or a list of (text, attrs) cells."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list] = {}
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", attrs, tag]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if len(self._row) == 1 and self._row[0][2] == "th" and "colspan" in self._row[0][1]:
                self._table.append(("group", self._row[0][0]))
            elif self._row and self._row[0][2] == "td":
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def tables(index: Path) -> dict[str, list]:
    p = _Tables()
    p.feed(index.read_text(encoding="utf-8"))
    return p.tables


@pytest.fixture
def results(tmp_path):
    return make_results(tmp_path / "results")


@pytest.fixture
def fake_viewer(tmp_path, monkeypatch):
    """A stand-in viewer build, so these tests need no npm (the browser test uses the real one)."""
    bundle = tmp_path / "viewer-dist" / "geco-viewer.js"
    bundle.parent.mkdir()
    bundle.write_text("window.GecoViewer = {start: function () {}};\n")
    monkeypatch.setattr(report, "VIEWER_BUNDLE", bundle)
    return bundle


def _summary(results: Path) -> dict:
    return json.loads((results / "summary.json").read_text())


def test_format_metric_decimals_and_missing():
    assert format_metric("psnr", 19.3149) == "19.31"
    assert format_metric("ssim", 0.82549) == "0.825"
    assert format_metric("cd", 0.02871) == "0.0287"
    assert format_metric("seconds", 0.3449) == "0.34"
    assert format_metric("lpips", None) == "n/a"
    assert format_metric("psnr", float("nan")) == "n/a"


def test_table1_holds_our_numbers_beside_the_papers(results, fake_viewer):
    summary = _summary(results)
    index = write_report(results)
    assert index == results / "report" / "index.html"
    rows = tables(index)["table1"]
    groups = [r[1] for r in rows if r[0] == "group"]
    assert groups[0] == "Paper" and [g for g in groups if "(zero123)" in g] and [g for g in groups if "(orbit)" in g]

    second_group = next(i for i, r in enumerate(rows) if r[0] == "group" and i > 0)
    paper = {r[0][0]: [c[0] for c in r[1:]] for r in rows[1:second_group]}
    assert len(paper) == len(report.PAPER_TABLE1)
    assert paper["GECO (0.64 s with a mesh)"] == ["19.31", "0.825", "0.154", "0.029", "0.599", "—", "0.34"]
    assert paper["LGM"][0] == "18.11"

    for vs in VIEW_SETS:
        start = next(i for i, r in enumerate(rows) if r[0] == "group" and r[1].endswith(f"({vs})"))
        ours = rows[start + 1:start + 1 + len(summary["models"])]
        for model, row in zip(summary["models"], ours):
            assert row[0][0] == report.MODEL_LABELS[model]
            cells = {c[1]["data-metric"]: c for c in row[1:]}
            m = summary["metrics"][model]
            for metric in ("psnr", "ssim", "cd", "viou", "fscore"):
                value = m[f"gso/{vs}/{metric}"]
                assert float(cells[metric][1]["data-value"]) == value
                assert cells[metric][0] == f"{value:.{report.DECIMALS[metric]}f}"
            seconds = m[f"gso/{vs}/seconds_generate"] + m[f"gso/{vs}/seconds_reconstruct"]
            assert cells["seconds"][0] == f"{seconds:.2f}"
            assert cells["psnr"][0] == f"{m[f'gso/{vs}/psnr']:.2f}"


def test_unavailable_metric_is_na_with_its_reason(results, fake_viewer):
    index = write_report(results)
    html = index.read_text()
    lpips = [c for r in tables(index)["table1"] if r[0] != "group" for c in r if c[1].get("data-metric") == "lpips"]
    ours = [c for c in lpips if "data-value" not in c[1]]
    assert ours and all(c[0] == "n/a" and "no AlexNet weights" in c[1]["title"] for c in ours)
    assert re.search(r'<ul id="unavailable"><li><strong>lpips</strong>: no AlexNet weights', html)


def test_table2_ablation_maps_our_models_to_the_papers_variants(results, fake_viewer):
    summary = _summary(results)
    rows = {r[0][0]: r for r in tables(write_report(results))["table2"] if r[0] != "group"}
    row = rows["GECO without stage 2"]
    assert row[1][0] == "18.75" and row[2][0] == report.MODEL_LABELS["stage1"]
    assert row[3][0] == f"{summary['metrics']['stage1']['gso/zero123/psnr']:.2f}"
    assert rows["Teacher, 1 step, no distillation"][1][0] == "14.79"
    missing = rows["GECO (stage 1 + stage 2)"]  # stage2 was not evaluated in this folder
    assert "not evaluated" in missing[2][0] and all(c[0] == "—" for c in missing[3:])


def test_per_object_table_and_csv(results, fake_viewer):
    index = write_report(results)
    rows = tables(index)["objects"]
    csv_lines = (results / "objects.csv").read_text().strip().splitlines()
    assert len(rows) == len(csv_lines) - 1 == 2 * 3 * 2
    first = dict(zip(csv_lines[0].split(","), csv_lines[1].split(",")))
    cells = {c[1]["data-metric"]: c for c in rows[0] if "data-metric" in c[1]}
    assert [c[0] for c in rows[0][:3]] == [first["object"], first["model"], first["view_set"]]
    assert cells["psnr"][0] == f"{float(first['psnr']):.2f}" and cells["lpips"][0] == "n/a"
    assert (index.parent / "objects.csv").read_text() == (results / "objects.csv").read_text()
    assert 'href="objects.csv"' in index.read_text()


@pytest.mark.parametrize("leakage", [
    {"clean": False, "detail": "teapot is in the training manifest"},
    {"detail": "no clean field"},
    {"clean": "true"},  # only JSON true means clean
    {"clean": True, "names": ["teapot"], "hashes": ["ab12"]},  # a check that contradicts itself is not clean
    None,  # the check did not run
])
def test_a_leaking_or_unchecked_evaluation_is_never_shown_as_clean(tmp_path, fake_viewer, leakage):
    results = make_results(tmp_path / "r", leakage=leakage if leakage is not None else {})
    if leakage is None:
        s = _summary(results)
        del s["leakage"]
        (results / "summary.json").write_text(json.dumps(s))
    index = write_report(results)
    html = index.read_text()
    assert '<p id="leakage" class="banner leak" data-clean="false">' in html
    assert "Leakage check: clean" not in html and "banner clean" not in html
    assert "<title>[NOT CLEAN]" in html
    t = tables(index)
    assert all("[NOT CLEAN]" in g[1] for g in t["table1"] if g[0] == "group" and g[1].startswith("Ours"))
    md = (index.parent / "report.md").read_text()
    assert md.startswith("# [NOT CLEAN]") and "NOT a" in md and "Leakage check: clean" not in md
    if leakage and leakage.get("clean") is False:
        assert "LEAKING EVALUATION" in html and "teapot is in the training manifest" in html
    if leakage and leakage.get("names"):
        assert "Names in the training data: teapot; 1 content hash(es) in the training data." in html


def test_a_clean_evaluation_says_so(results, fake_viewer):
    html = write_report(results).read_text()
    assert '<p id="leakage" class="banner clean" data-clean="true">Leakage check: clean.' in html
    assert "NOT CLEAN" not in html


def test_markdown_holds_the_same_tables(results, fake_viewer):
    summary = _summary(results)
    md = (write_report(results).parent / "report.md").read_text()
    assert "| GECO (0.64 s with a mesh) | 19.31 | 0.825 | 0.154 | 0.029 | 0.599 | — | 0.34 |" in md
    for vs in VIEW_SETS:
        block = md.split(f"({vs})* |")[1]
        for model in summary["models"]:
            m = summary["metrics"][model]
            want = [f"{m[f'gso/{vs}/{k}']:.{report.DECIMALS[k]}f}" if m[f"gso/{vs}/{k}"] is not None else "n/a"
                    for k in ("psnr", "ssim", "lpips", "cd", "viou", "fscore")]
            assert f"| {report.MODEL_LABELS[model]} | " + " | ".join(want) + " |" in block
    assert "| GECO without stage 2 | 18.75 |" in md
    assert "CC BY 4.0" in md and "Google LLC" in md and "`0123abcd`" in md
    assert "](images/alarm.png)" in md and "](objects.csv)" in md


def test_notes_on_method_are_shown_in_both(results, fake_viewer):
    s = _summary(results)
    s["notes"] = ["Depth: the rendered Gaussians' expected z at 16 cameras, back-projected where alpha > 0.5."]
    (results / "summary.json").write_text(json.dumps(s))
    index = write_report(results)
    assert "<li>Depth: the rendered Gaussians&#x27; expected z" in index.read_text()
    assert "- Depth: the rendered Gaussians' expected z" in (index.parent / "report.md").read_text()


def test_the_page_uses_only_files_in_its_folder(results, fake_viewer):
    index = write_report(results)
    out = index.parent
    html = index.read_text()
    refs = re.findall(r'(?:src|href|data-splat-src)="([^"]+)"', html)
    assert refs
    for ref in refs:
        if ref == "data:,":  # the empty favicon
            continue
        assert not re.match(r"^[a-z]+:", ref), f"{ref}: the page must not need the network"
        target = (out / ref).resolve()
        assert target.is_file(), ref
        if not ref.startswith("../ply/"):  # the .ply downloads stay in the results folder
            assert out.resolve() in target.parents, ref
    assert 'type="module"' not in html  # module scripts are blocked on file:// pages
    assert (out / "viewer" / "geco-viewer.js").read_bytes() == fake_viewer.read_bytes()
    assert "Google Scanned Objects by Google LLC, licensed under CC BY 4.0" in html
    assert "0123abcd" in html and "cafe1234" in html and "outputs/stage1/bundle" in html


def test_each_ply_becomes_a_sidecar_script_holding_its_bytes(results, fake_viewer):
    out = write_report(results).parent
    html = (out / "index.html").read_text()
    for obj in ("alarm", "teapot"):
        for model in ("teacher", "teacher_1step", "stage1"):
            assert f'data-splat-key="{obj}/{model}" data-splat-src="splats/{obj}/{model}.js"' in html
            text = (out / "splats" / obj / f"{model}.js").read_text()
            m = re.fullmatch(r'\(window\.GecoSplats = window\.GecoSplats \|\| \{\}\)\["([^"]+)"\] = "([^"]+)";\n', text)
            assert m and m.group(1) == f"{obj}/{model}"
            assert base64.b64decode(m.group(2)) == (results / "ply" / obj / f"{model}.ply").read_bytes()


def test_rewriting_replaces_the_report_whole(results, fake_viewer):
    first = write_report(results)
    stale = first.parent / "splats" / "gone" / "old.js"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    assert write_report(results) == first and not stale.exists()
    assert not list(results.glob(".report*"))


def test_without_the_viewer_build_the_page_says_how_to_build_it(results, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(report, "VIEWER_BUNDLE", tmp_path / "missing" / "geco-viewer.js")
    with caplog.at_level("WARNING", logger="geco.eval.report"):
        index = write_report(results)
    html = index.read_text()
    assert "make install" in html and "geco-viewer.js" not in html
    assert not (index.parent / "viewer").exists()
    assert any("make install" in r.getMessage() for r in caplog.records)
    assert tables(index)["table1"]  # the numbers are there all the same


@pytest.mark.parametrize("breakage, expected", [
    ("no-folder", "no such results folder"),
    ("no-summary", "summary.json: not found"),
    ("bad-json", "summary.json: not valid JSON"),
    ("no-models", "'models' must be a list"),
    ("bad-name", "cannot be a file name"),
])
def test_a_folder_the_report_cannot_use_is_one_line(tmp_path, capsys, breakage, expected):
    results = make_results(tmp_path / "r", objects=("alarm",), models=("stage1",))
    s = _summary(results)
    if breakage == "no-folder":
        results = tmp_path / "nowhere"
    elif breakage == "no-summary":
        (results / "summary.json").unlink()
    elif breakage == "bad-json":
        (results / "summary.json").write_text("{not json")
    elif breakage == "no-models":
        del s["models"]
        (results / "summary.json").write_text(json.dumps(s))
    elif breakage == "bad-name":
        s["objects"] = ["../../etc"]
        (results / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ReportError, match=re.escape(expected)):
        write_report(results)
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geco: ") and expected in err and err.count("\n") == 1
    assert not (results / "report").exists()


def test_geco_report_prints_the_page(results, fake_viewer, capsys):
    assert main(["report", str(results)]) == 0
    assert capsys.readouterr().out.strip() == str(results / "report" / "index.html")
    assert (results / "report" / "report.md").is_file()


def test_all_metrics_of_the_contract_have_a_format():
    assert set(METRICS) <= set(report.DECIMALS) and set(METRICS) <= set(report.METRIC_LABELS)
