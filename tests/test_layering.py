"""The layering of docs/DESIGN.md: core math knows nothing of Ray; reports start without torch."""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "cgc_ray"
CORE = ["cam", "transforms", "loss", "metrics", "models", "weights", "engine", "trial", "evaluation", "figures",
        "data/__init__", "data/formats", "data/dataset", "data/splits", "data/synthetic"]
RAY_LAYER = {"tune_runner", "progress", "cluster"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_modules_do_not_import_ray(module):
    assert "ray" not in _imports(PKG / f"{module}.py")


def test_only_the_ray_layer_imports_ray_anywhere():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.stem not in RAY_LAYER and "ray" in _imports(path):
            offenders.append(path.name)
    assert offenders == []


@pytest.mark.parametrize("module", ["cam", "loss", "engine", "trial", "data"])
def test_core_imports_at_runtime_without_ray_rich_or_pydantic_leaking_in(module):
    code = f"import sys, cgc_ray.{module}; print(sorted(m for m in ('ray', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["report", "results", "spec", "plots", "cli"])
def test_report_side_starts_without_torch_or_ray(module):
    code = f"import sys, cgc_ray.{module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
