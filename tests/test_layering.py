"""The layers of docs/DESIGN.md, as imports: each subpackage may import only what this file allows.

config (pydantic) -> data, method, models (torch) -> train -> explain -> runner (the only Ray) -> cli;
results (pyarrow, rich, scipy) beside them, starting without torch or Ray. Every import counts, the
ones inside functions too, except those under ``if TYPE_CHECKING:``, which never run: they name a type for
type checkers (``method.cgc`` reads the spec's ``MethodSpec`` without importing pydantic), and the
subprocess tests below show what really loads.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "cgc_ray"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# subpackage -> (third-party top-level modules it may import, cgc_ray modules it may import)
ALLOWED: dict[str, tuple[set[str], set[str]]] = {
    "config": ({"pydantic", "yaml"}, {"config", "data.registry", "models.archs"}),
    "data": ({"numpy", "PIL", "scipy", "pyarrow", "torch", "torchvision", "matplotlib"}, {"data"}),
    "method": ({"torch", "torchvision", "numpy", "scipy"}, {"method"}),
    "models": ({"torch", "torchvision", "numpy"}, {"models", "method.cam"}),
    # the storage root and its layout (a module, not a package): pyarrow, the URI rule of config.paths and the
    # name rule of config.base; boto3 (the s3 extra, imported on first use) for S3's conditional write
    "storage": ({"pyarrow", "boto3", "botocore"}, {"storage", "config.paths", "config.base"}),
    "train": ({"torch", "numpy", "pyarrow"}, {"train", "method", "models", "data", "config", "storage"}),
    "explain": ({"torch", "torchvision", "numpy", "PIL", "matplotlib"},
                {"explain", "method", "models", "data", "train", "config", "results.table", "storage"}),
    "results": ({"pyarrow", "rich", "scipy", "matplotlib", "numpy", "pandas"}, {"results", "config", "storage"}),
    "runner": ({"ray", "torch", "rich", "yaml", "pyarrow", "optuna"},
               {"runner", "config", "data", "train", "results.table", "method", "models", "storage"}),
    "cli": ({"rich", "torch", "matplotlib", "yaml"}, {"cli", "config", "data", "models", "results", "runner", "explain",
                                              "train", "storage"}),
}


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as dotted absolute names."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names if module.startswith("cgc_ray")}
    return names


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).parts
        if len(rel) > 1:
            yield rel[0], path
        elif path.stem != "__init__":  # a top-level module is a layer of its own
            yield path.stem, path


@pytest.mark.parametrize("sub, path", list(_modules()), ids=lambda v: str(v.relative_to(PKG)) if hasattr(v, "parts") else v)
def test_every_import_is_allowed_for_its_subpackage(sub, path):
    third_party, internal = ALLOWED[sub]
    bad = []
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "cgc_ray":
            rest = name.removeprefix("cgc_ray").lstrip(".")
            ok = not rest or any(rest == a or rest.startswith(a + ".") or a.startswith(rest + ".") or a == rest
                                 for a in internal)
            # `from cgc_ray.x import name` adds "x.name": allowed when x itself is allowed
            ok = ok or any(rest.rsplit(".", 1)[0] == a or rest.rsplit(".", 1)[0].startswith(a + ".") for a in internal)
        else:
            ok = top in STDLIB or top in third_party
        if not ok:
            bad.append(name)
    assert bad == [], f"{path.relative_to(PKG)} imports {sorted(bad)}; {sub}/ may import {sorted(third_party)} " \
                      f"and cgc_ray.{{{', '.join(sorted(internal))}}}"


def test_every_subpackage_has_a_rule():
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    layers |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert layers == set(ALLOWED)


def _loaded(module: str, watch: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(sorted(m for m in {watch!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out)


@pytest.mark.parametrize("module", ["cgc_ray.config", "cgc_ray.data", "cgc_ray.models", "cgc_ray.results.report",
                                    "cgc_ray.results.table", "cgc_ray.results.plots", "cgc_ray.results.html",
                                    "cgc_ray.results.notebook", "cgc_ray.cli.main"])
def test_starts_without_torch_or_ray(module):
    """The spec, the data registry, ``cgc-ray report`` and ``--help`` start in well under a second.

    The one home of the "imports no torch/ray" checks: other test files do not repeat them.
    """
    assert _loaded(module, ("torch", "ray")) == []


@pytest.mark.parametrize("module", ["cgc_ray.method.cgc", "cgc_ray.method.excitation", "cgc_ray.models.checkpoint",
                                    "cgc_ray.data.dataset"])
def test_core_math_loads_no_ray_rich_or_pydantic(module):
    assert _loaded(module, ("ray", "rich", "pydantic")) == []


def test_training_loads_no_ray_or_rich():
    assert _loaded("cgc_ray.train.trial", ("ray", "rich")) == []
