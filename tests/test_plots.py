"""Result plots from Parquet rows: which files are written, the numbers drawn."""

import math

import pytest
from conftest import result_row
from PIL import Image

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    expand_trials,
    load_spec,
)
from cgc_ray.results import plots as pl
from cgc_ray.results import stats
from cgc_ray.results.table import read_rows, write_row

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(storage, spec, metrics):
    for t in expand_trials(spec):
        write_row(str(storage), t.name, result_row(t, metrics(t)))


def _lambda_rows(storage):
    """λ in {0, 0.1, 1} x seed {0, 1}: top1 = 60 + 10 λ + seed, ch = 50 - 3 λ + seed."""
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           ["sweep.grid.method.lam=[0.0, 0.1, 1.0]", "sweep.grid.seed=[0, 1]"])
    _write(storage, spec, lambda t: {"top1": 60 + 10 * t.method.lam + t.seed, "ch": 50 - 3 * t.method.lam + t.seed})


def _fewshot_rows(storage):
    """5-shot, episodes 0..2: baseline top1 50, 52, 57; CGC 53, 52, 61 (paired d = 3, 0, 4)."""
    values = {("baseline", 0): 50.0, ("baseline", 1): 52.0, ("baseline", 2): 57.0,
              ("cgc", 0): 53.0, ("cgc", 1): 52.0, ("cgc", 2): 61.0}
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), ["sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1, 2]"])
    _write(storage, spec,
           lambda t: {"top1": values[(t.method.name, t.data.episode)], "ch": 40.0 + t.data.episode})


def test_pareto_front_hand_example():
    pts = [(1, 5), (2, 4), (3, 1), (2, 2), (0, 6), (3, 1), (0, 5)]
    assert pl.pareto_front(pts) == [2, 1, 0, 4]  # (2, 2) and (0, 5) dominated, duplicate (3, 1) once
    assert pl.pareto_front([(1, 1)]) == [0]
    assert pl.pareto_front([]) == []


def test_all_plots_written_as_valid_pngs(tmp_path):
    _lambda_rows(tmp_path / "res")
    _fewshot_rows(tmp_path / "res")
    paths = pl.plot_results(str(tmp_path / "res"), tmp_path / "plots", dpi=50)
    assert [p.name for p in paths] == ["lambda_ablation.png", "accuracy_vs_ch.png", "fewshot_gains.png"]
    sizes = {}
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            sizes[p.name] = im.size
    assert sizes["lambda_ablation.png"] == (round(50 * 4.2 * 2), round(50 * 3.4))
    assert sizes["accuracy_vs_ch.png"] == (round(50 * 6.4), round(50 * 4.6))


def test_plots_draw_report_numbers(tmp_path):
    _lambda_rows(tmp_path)
    _fewshot_rows(tmp_path)
    table = read_rows(str(tmp_path))
    groups, paired = stats.summarize(table), stats.paired_differences(table)

    lam = pl.plot_lambda_ablation(groups)
    top1_ax, ch_ax = lam.axes
    (series,) = top1_ax.containers  # one ErrorbarContainer: (data line, caps, bars)
    line = series.lines[0]
    assert list(line.get_xdata()) == [0.0, 0.1, 1.0]
    assert list(line.get_ydata()) == pytest.approx([60.5, 61.5, 70.5])
    assert list(ch_ax.containers[0].lines[0].get_ydata()) == pytest.approx([50.5, 50.2, 47.5])

    scatter = pl.plot_accuracy_vs_ch(groups)
    front = next(ln for ln in scatter.axes[0].lines if ln.get_label() == "Pareto front")
    # (CH, top-1): λ=0 (50.5, 60.5), λ=0.1 (50.2, 61.5), λ=1 (47.5, 70.5) all trade off; few-shot points are dominated
    assert list(front.get_xdata()) == pytest.approx([50.5, 50.2, 47.5])  # by CH, descending
    assert list(front.get_ydata()) == pytest.approx([60.5, 61.5, 70.5])

    gains = pl.plot_fewshot_gains(paired)
    (series,) = gains.axes[0].containers
    assert list(series.lines[0].get_ydata()) == pytest.approx([7 / 3])
    half = 4.302653 * math.sqrt(13 / 3) / math.sqrt(3)  # t_{0.975, 2} sd(d) / sqrt(n), d = (3, 0, 4)
    bars = series.lines[2][0].get_segments()[0]  # the CI bar: [(x, low), (x, high)]
    assert [y for _, y in bars] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-5)


def test_only_plots_with_data_are_written(tmp_path):
    _fewshot_rows(tmp_path / "res")
    paths = pl.plot_results(str(tmp_path / "res"), tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy_vs_ch.png", "fewshot_gains.png"]  # λ never varies
    assert pl.plot_results(str(tmp_path / "res"), tmp_path / "only_lam", experiment="lambda_ablation") == []
    assert not (tmp_path / "only_lam").exists()
    assert pl.plot_results(str(tmp_path / "nothing"), tmp_path / "none") == []


def test_report_cli_plot_option(tmp_path, capsys):
    _lambda_rows(tmp_path / "res")
    assert cli_main(["report", "--storage", str(tmp_path / "res"), "--format", "markdown",
                     "--plot", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy_vs_ch.png", "lambda_ablation.png"]
    assert "λ=0.1" in capsys.readouterr().out


def test_fewshot_gains_one_series_per_cgc_configuration(tmp_path):
    """CGC configurations that differ in forward (or λ, view, ...) are separate, named series, not one merged."""
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [
        "sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1]", "sweep.variants=[{}, {method.forward: separate}]"])
    _write(tmp_path, spec, lambda t: {"top1": 50.0 + t.data.episode + (t.method.name == "cgc")
                                      * (1 + 10 * (t.method.forward == "separate"))})
    gains = pl.plot_fewshot_gains(stats.paired_differences(read_rows(str(tmp_path))))
    top1 = gains.axes[0]
    means = {c.get_label(): list(c.lines[0].get_ydata()) for c in top1.containers}
    assert means == {"synthetic cgc forward=joint−baseline": pytest.approx([1.0]),
                     "synthetic cgc forward=separate−baseline": pytest.approx([11.0])}
