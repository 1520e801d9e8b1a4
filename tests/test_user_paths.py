"""The product's user paths as users type them: relative paths, the default storage, the CLI from any folder.

Ray runs each Tune trial in its own working directory, so a path left
relative until a trial resolves it lands in Ray's trial folder. Every local
path is made absolute on the driver, against the folder the user ran the
command in; these tests run the scripts from a temporary folder with relative
paths, as a user does, and look for the rows where the user asked for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    load_spec,
    path_fields,
    resolve_path_value,
    resolve_paths,
    unresolved_paths,
)
from cgc_ray.results.table import read_rows

REPO = Path(__file__).resolve().parent.parent


def _sets(*overrides: str) -> list[str]:
    out = []
    for o in [*TINY, *overrides]:
        out += ["--set", o]
    return out


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    # RAY_ADDRESS stays: conftest's "local" gives the driver a Ray of its own, whatever runs on this machine
    env = {k: v for k, v in os.environ.items() if k not in ("CGC_RAY_STORAGE", "CGC_RAY_DATA_ROOT")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- resolution itself


def test_every_path_like_field_is_known():
    assert path_fields() == {"storage": "storage", "data.root": "path", "data.split_file": "path",
                             "model.weights": "weights"}


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("storage", "./results", "/home/u/exp/results"),
        ("storage", "results/../out", "/home/u/exp/out"),
        ("storage", "s3://bucket/prefix", "s3://bucket/prefix"),
        ("storage", "gs://bucket/p", "gs://bucket/p"),
        ("storage", "file:///shared/results", "file:///shared/results"),
        ("path", "/abs/data", "/abs/data"),
        ("path", "data/cub", "/home/u/exp/data/cub"),
        ("weights", "swav:swav_800ep_pretrain.pth.tar", "swav:/home/u/exp/swav_800ep_pretrain.pth.tar"),
        ("weights", "swav:/w/swav.pth", "swav:/w/swav.pth"),
        ("weights", "ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"),
        ("weights", "ckpt/model.pt", "/home/u/exp/ckpt/model.pt"),
        ("weights", "s3://bucket/ckpt.pt", "s3://bucket/ckpt.pt"),
    ],
)
def test_resolve_path_value(kind, value, expected):
    assert resolve_path_value(value, kind, "/home/u/exp") == expected


def test_home_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert resolve_path_value("~/data", "path", "/elsewhere") == "/home/someone/data"


def test_resolve_paths_covers_fields_and_sweep_axes_and_is_idempotent(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["semisup"]), [
        "storage=out", "data.root=imagenet", "data.split_file=splits/1percent.txt",
        "sweep.grid.data.root=[a, /b, s3://c/d]"])
    assert sorted(unresolved_paths(spec)) == [
        "data.root='imagenet'", "data.split_file='splits/1percent.txt'",
        "model.weights='swav:swav_800ep_pretrain.pth.tar'", "storage='out'"]
    r = resolve_paths(spec, tmp_path)
    assert r.storage == str(tmp_path / "out") and r.data.root == str(tmp_path / "imagenet")
    assert r.data.split_file == str(tmp_path / "splits/1percent.txt")
    assert r.model.weights == f"swav:{tmp_path}/swav_800ep_pretrain.pth.tar"
    assert r.sweep.grid["data.root"] == [str(tmp_path / "a"), "/b", "s3://c/d"]
    assert unresolved_paths(r) == [] and resolve_paths(r, "/somewhere/else") == r


def test_cli_resolves_against_the_callers_folder(tmp_path, monkeypatch):
    from cgc_ray.cli import experiment as experiment_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CGC_RAY_STORAGE", raising=False)
    monkeypatch.delenv("CGC_RAY_DATA_ROOT", raising=False)
    args = experiment_cli.build_parser("x", "").parse_args(["--dataset", "synthetic", "--data-root", "data"])
    spec = experiment_cli.resolve_spec(args, "lambda_ablation")
    assert spec.storage == str(tmp_path / "results") and spec.data.root == str(tmp_path / "data")
    assert spec.model.arch == "resnet_small"  # --dataset synthetic keeps the demo preset


def test_cluster_environment_supplies_storage_and_data_root(tmp_path, monkeypatch):
    """``ray submit cluster/gpu.yaml experiments/X.py`` passes no flags: the nodes' environment does."""
    from cgc_ray.cli import experiment as experiment_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CGC_RAY_STORAGE", "s3://bucket/cgc-ray")
    monkeypatch.setenv("CGC_RAY_DATA_ROOT", "/data")
    spec = experiment_cli.resolve_spec(experiment_cli.build_parser("x", "").parse_args([]), "fewshot")
    assert (spec.storage, spec.data.root, spec.data.dataset) == ("s3://bucket/cgc-ray", "/data", "cub200")
    flags = experiment_cli.build_parser("x", "").parse_args(["--storage", "mine", "--dataset", "synthetic"])
    spec = experiment_cli.resolve_spec(flags, "fewshot")  # flags win over the environment
    assert spec.storage == str(tmp_path / "mine")


# ---------------------------------------------------------------- as a user runs them


@pytest.mark.slow
def test_script_with_relative_storage_and_data_root_then_report(tmp_path):
    p = _run([sys.executable, str(REPO / "experiments/lambda_ablation.py"), "--storage", "results",
              "--dataset", "synthetic", "--data-root", "data", "--no-progress", "--no-report",
              *_sets("sweep.grid.method.lam=[0.0, 0.5]", "sweep.grid.seed=[0]")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 ran now (0 diverged), 0 failed" in p.stderr
    rows = read_rows(str(tmp_path / "results"), "lambda_ablation").to_pylist()
    assert sorted(r["lam"] for r in rows) == [0.0, 0.5]
    assert any((tmp_path / "data").rglob("images.txt"))  # the embedded set was generated under ./data
    ckpts = list((tmp_path / "results" / "_checkpoints" / "lambda_ablation").glob("*/checkpoint.pt"))
    assert len(ckpts) == 2
    report = _run(["cgc-ray", "report", "--experiment", "lambda_ablation", "--format", "markdown"], tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| metric |" in report.stdout and "λ=0.5" in report.stdout


@pytest.mark.slow
def test_run_with_a_relative_spec_file(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [
        *TINY, "data.shots=2", "sweep.grid.data.shots=[2]", "sweep.grid.data.episode=[0]",
        "sweep.grid.method.name=[cgc]"]).model_dump(mode="json")
    spec["storage"] = "out/store"
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "mine.yaml").write_text(yaml.safe_dump(spec))
    p = _run(["cgc-ray", "run", "--spec", "specs/mine.yaml", "--no-progress"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_rows(str(tmp_path / "out" / "store"), "fewshot").to_pylist()
    assert [(r["method"], r["shots"]) for r in rows] == [("cgc", 2)]
    assert "fewshot" in p.stdout and "top1 cgc" in p.stdout  # the table was printed from ./out/store


@pytest.mark.slow
def test_readme_first_command_in_spirit(tmp_path):
    """The README's main job with no --storage (so ./results), from a fresh folder, at a tiny size."""
    p = _run([sys.executable, str(REPO / "experiments/lambda_ablation.py"), "--no-progress",
              *_sets("sweep.grid.method.lam=[0.0, 0.5]", "sweep.grid.seed=[0]")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list((tmp_path / "results" / "experiment=lambda_ablation").glob("*.parquet"))) == 2
    report = _run(["cgc-ray", "report", "--experiment", "lambda_ablation"], tmp_path)
    assert report.returncode == 0 and "no finished trials" not in report.stdout, report.stdout
    assert "λ=0.5" in report.stdout and "top1" in report.stdout
