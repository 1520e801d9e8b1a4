"""The HTML report without a browser: its tables are the text report's, it is self-contained, the heatmap panel
of kept checkpoints, the command line, the page beside the summary, and the notebook object."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import TINY, result_row
from PIL import Image

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, trial_id
from cgc_ray.explain.figures import report_heatmaps
from cgc_ray.models.checkpoint import save_checkpoint
from cgc_ray.models.resnet import build_model
from cgc_ray.results import Report
from cgc_ray.results import report as rp
from cgc_ray.results.html import render_html, write_page
from cgc_ray.results.table import write_row
from cgc_ray.storage import Storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """The page's tables (caption, header, rows of cell text, each cell's attributes) and images."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self._cell, self._caption = [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": "", "header": [], "rows": [], "attrs": []})
        elif tag == "caption":
            self._caption = ""
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
            self.tables[-1]["attrs"].append([])
        elif tag in ("td", "th"):
            self._cell = (tag, attrs, "")
        elif tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell = (*self._cell[:2], self._cell[2] + data)
        elif self._caption is not None:
            self._caption += data

    def handle_endtag(self, tag):
        if tag == "caption":
            self.tables[-1]["caption"], self._caption = self._caption, None
        elif tag in ("td", "th") and self._cell is not None:
            kind, attrs, text = self._cell
            self.tables[-1]["rows"][-1].append(text)
            self.tables[-1]["attrs"][-1].append(attrs)
            self._cell = None

    def table_cells(self) -> list[tuple[str, list[list[str]]]]:
        """(caption, [header, *rows]) of each table."""
        return [(t["caption"], t["rows"]) for t in self.tables]


def _markdown_tables(md: str) -> list[tuple[str, list[list[str]]]]:
    """(title, [header, *rows]) of each table of ``cgc-ray report --format markdown``."""
    out = []
    for line in md.splitlines():
        if line.startswith("**"):
            out.append((line.strip("*"), []))
        elif line.startswith("|") and not line.startswith("|---"):
            out[-1][1].append([c.strip() for c in line.strip().removeprefix("| ").removesuffix(" |").split(" | ")])
    return out


def _rows(storage: Path) -> None:
    """λ ablation, λ 0 / 0.1 / 1 x seeds 0..2: CGC at λ = 1 gains top-1 on every seed (significant), λ = 0.1 does
    not; one λ = 0.1 trial diverged. A 5-shot sweep beside it."""
    lam = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                          ["sweep.grid.method.lam=[0.0, 0.1, 1.0]", "sweep.grid.seed=[0, 1, 2]"])
    for t in expand_trials(lam):
        top1 = 60 + [0.0, 1.0, -2.0][t.seed] * (t.method.lam == 0.1) + (3 + t.seed) * (t.method.lam == 1.0) + t.seed
        diverged = (t.method.lam, t.seed) == (0.1, 2)
        write_row(str(storage), t.name, result_row(t, {} if diverged else {"top1": top1, "ch": 40 + 10 * t.method.lam},
                                                   status="diverged" if diverged else "finished"))
    few = apply_overrides(load_spec(PRESETS["fewshot_demo"]),
                          ["sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1]"])
    for t in expand_trials(few):
        write_row(str(storage), t.name, result_row(t, {"top1": 50 + 2 * t.data.episode + (t.method.name == "cgc"),
                                                       "ch": 30.0 + t.data.episode}))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A storage of made-up rows, and the page ``cgc-ray report --format html --out`` wrote of it (drawn once:
    matplotlib takes seconds)."""
    storage, out = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("page") / "report.html"
    _rows(storage)
    assert cli_main(["report", "--storage", str(storage), "--format", "html", "--out", str(out)]) == 0
    return storage, out.read_text(encoding="utf-8")


def test_the_pages_tables_are_the_text_reports_cell_for_cell(written):
    storage, text = written
    results = rp.load(str(storage))
    page = _Page(text)
    assert page.table_cells() == _markdown_tables(rp.render(results, "markdown"))
    # a paired difference whose 95 % interval excludes 0 is marked, by its sign; the others are not
    marked = {(a.get("class"), text) for t in page.tables for row, attrs in zip(t["rows"], t["attrs"])
              for text, a in zip(row, attrs) if a.get("data-kind") == "paired" and a.get("data-metric") == "top1"}
    assert marked == {("sig-up", "+4.00 [1.52, 6.48] (3)"), (None, "+0.50 [-5.85, 6.85] (2)"),
                      ("sig-up", "+1.00 [1.00, 1.00] (2)")}  # few-shot: +1 on both episodes, an interval of width 0
    # every statistic's cell names its summary row (cgc-ray report --format json)
    summary = {(r["kind"], r["labels_json"], r["metric"]) for r in json.loads(rp.render(results, "json"))}
    cells = {(a["data-kind"], a["data-labels"], a["data-metric"]) for t in page.tables for attrs in t["attrs"]
             for a in attrs if "data-kind" in a}
    assert cells == summary


def test_the_page_is_self_contained_and_every_image_has_alt_text(written):
    _, text = written
    assert not re.search(r"(?:src|href)=\"(?!data:|#)", text)  # nothing fetched: no URL but data: and anchors
    assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text
    page = _Page(text)
    assert len(page.images) == 4  # λ ablation and accuracy vs CH; few-shot gains and accuracy vs CH
    for img in page.images:
        assert img["alt"].strip()
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.verify()
    assert text.count("No heatmaps: no checkpoint of trial") == 2  # made-up rows: each panel says why it is absent


def test_provenance_names_code_data_swept_settings_and_statuses(written):
    _, text = written
    assert "<dd>8 finished, 1 diverged</dd>" in text
    assert "λ ∈ {0, 0.1, 1}; seed ∈ {0, 1, 2}" in text
    assert "<dd>test</dd>" in text  # the rows' code_version
    assert "<dt>dataset</dt><dd>synthetic</dd>" in text and "cgc-ray run --spec trial.json" in text


def keep_random_checkpoint(storage: Path, trial) -> None:
    """The checkpoint a sweep keeps of ``trial`` (``failure.keep_checkpoint=model``), of an untrained small model."""
    torch.manual_seed(int(10 * trial.method.lam) + trial.seed)
    model = build_model("resnet_small", 5)
    save_checkpoint(Storage(str(storage)).checkpoint_path(trial.name, trial_id(trial)), model,
                    torch.optim.SGD(model.parameters(), lr=0.1), None, 0,
                    extra={"method": {"name": trial.method.name, "lam": trial.method.lam, "layer": "layer4"}})


def _synthetic_trials(storage: Path, *extra: str, checkpoints: bool = True) -> list:
    """A λ 0 / 1 sweep on the tiny demo set (rows made up), with a checkpoint of a random model per trial."""
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [*TINY, "sweep.grid.method.lam=[0.0, 1.0]", "sweep.grid.seed=[0]", *extra])
    trials = expand_trials(spec)
    for t in trials:
        write_row(str(storage), t.name, result_row(t, {"top1": 50.0, "ch": 30 + 20 * t.method.lam},
                                                   details={"eval_split": "test"}))
        if checkpoints:
            keep_random_checkpoint(storage, t)
    return trials


def test_heatmap_panel_of_kept_checkpoints_and_why_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr("cgc_ray.results.html._plots", lambda results, experiment: "")  # seconds, tested above
    base, cgc = _synthetic_trials(tmp_path)
    png, caption = report_heatmaps(str(tmp_path), "lambda_ablation", n=3)
    assert png[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(png)) as im:  # two rows (baseline above CGC) of three images
        assert im.size == (round(80 * (1.8 * 3 + 0.6)), round(80 * (1.8 * 2 + 0.4)))
    assert f"baseline (trial {trial_id(base)}, seed 0) above cgc λ=1 (trial {trial_id(cgc)}, seed 0)" in caption
    page = _Page(render_html(rp.load(str(tmp_path)), heatmaps={"lambda_ablation": (png, caption)}))
    assert [img["alt"] for img in page.images if "Grad-CAM" in img["alt"]] == [
        f"lambda_ablation: Grad-CAM heatmaps, {caption}"]

    Path(Storage(str(tmp_path)).checkpoint_path("lambda_ablation", trial_id(base))).unlink()
    assert report_heatmaps(str(tmp_path), "lambda_ablation") == (
        None, f"no checkpoint of trial {trial_id(base)} (none at "
              f"{Storage(str(tmp_path)).checkpoint_path('lambda_ablation', trial_id(base))})")
    none = tmp_path / "none"
    _synthetic_trials(none, "failure.keep_checkpoint=none", checkpoints=False)
    png, why = report_heatmaps(str(none), "lambda_ablation")
    assert png is None and "failure.keep_checkpoint=none" in why
    assert report_heatmaps(str(tmp_path / "empty"), "lambda_ablation") == (
        None, "no finished CGC trial (λ > 0) with a CH to show")


def test_heatmap_panel_of_a_fewshot_sweep_draws_its_episodes_held_out_images(tmp_path, monkeypatch):
    """A few-shot trial's metrics are on its episode's held-out images, which no named split holds."""
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]),
                           [*TINY, "sweep.grid={data.shots: [1], data.episode: [0], method.lam: [0.0, 0.5]}",
                            "sweep.variants=[]", "model.weights=null"])
    trials = expand_trials(spec)
    for t in trials:
        write_row(str(tmp_path), t.name, result_row(t, {"top1": 50.0, "ch": 30 + 20 * t.method.lam}))
        keep_random_checkpoint(tmp_path, t)
    png, caption = report_heatmaps(str(tmp_path), spec.name, n=2)
    assert png is not None and png[:8] == PNG_SIGNATURE, caption
    assert "minus the 1 shots" in caption


def test_cli_prints_the_page_and_refuses_a_page_without_a_file(tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    assert cli_main(["report", "--storage", str(tmp_path / "results"), "--format", "html", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err  # the storage is checked as for every format
    (tmp_path / "results").mkdir()
    assert cli_main(["report", "--storage", str(tmp_path / "results"), "--format", "html", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "No finished trials in this storage yet" in out.read_text(encoding="utf-8")
    assert cli_main(["report", "--storage", str(tmp_path / "results"), "--format", "html"]) == 2
    assert "writes a page to --out FILE" in capsys.readouterr().err
    assert cli_main(["report", "--storage", str(tmp_path / "results"), "--out", str(out)]) == 2
    assert "--out is for --format html only" in capsys.readouterr().err


def test_the_page_beside_the_summary_shows_its_experiment_alone(written, monkeypatch):
    storage, _ = written
    monkeypatch.setattr("cgc_ray.results.html._plots", lambda results, experiment: "")  # drawn above already
    results = rp.load(str(storage))
    path = write_page(results, "fewshot", (None, "no checkpoints here"))
    assert path == Storage(str(storage)).summary_html_path("fewshot") == f"{storage}/_summary/fewshot.html"
    text = Path(path).read_text(encoding="utf-8")
    assert 'id="exp-fewshot"' in text and 'id="exp-lambda_ablation"' not in text
    assert "No heatmaps: no checkpoints here" in text
    assert rp.load(str(storage)).groups == results.groups  # a file Parquet readers skip: the rows are as they were


def test_notebook_report_tables_summary_and_html(written, tmp_path, monkeypatch):
    storage, _ = written
    report = Report(storage)
    assert report.experiments == ["fewshot", "lambda_ablation"]
    frames = report.tables()
    expected = _markdown_tables(rp.report(str(storage), fmt="markdown"))
    got = [(f.attrs["title"], [list(f.columns), *f.values.tolist()]) for name in report.experiments
           for f in frames[name]]
    assert got == expected
    columns = ["kind", "labels_json", "metric", "n", "mean"]
    assert report.summary()[columns].values.tolist() == [
        [r[c] for c in columns] for r in json.loads(rp.report(str(storage), fmt="json"))]
    monkeypatch.setenv("CGC_RAY_STORAGE", str(tmp_path))
    empty = Report()  # the --storage rule: $CGC_RAY_STORAGE
    assert empty.results.storage == str(tmp_path) and empty.tables() == {}
    frame = empty._repr_html_()  # the page, in a frame of its own: its styles stay out of the notebook's
    assert frame.startswith('<iframe srcdoc="&lt;!DOCTYPE html&gt;') and "No finished trials" in frame
