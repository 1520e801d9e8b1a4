"""The vocabulary of results: how a setting, a value and a configuration are named, and which table shows an experiment.

The report's tables, the plots' legends and the summary all name things here:

- :func:`field_name`: a dotted spec field as a column or legend name (the
  paper's symbols λ and τ; else the field's name within its section);
- :func:`value_text`, :func:`config_label`: a value, and a configuration as
  its method (and λ) followed by ``name=value`` of the settings that tell it
  from the others (:func:`cgc_ray.results.stats.cgc_settings_that_differ`);
- :func:`varying`, :func:`sort_key`: which settings differ, and in what order
  configurations are listed (methods in the spec's order);
- :func:`layout_of`: the paper table an experiment is, read off its trials'
  own specs, never off its name.

No torch, no Ray: label dicts, spec trees and the rows' ``config_json`` column only.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Literal, Mapping, Sequence, get_args

import pyarrow as pa

from cgc_ray.config import MethodSpec
from cgc_ray.config.base import canonical, flatten
from cgc_ray.config.identity import CGC_ONLY_FIELDS, NON_IDENTITY_FIELDS, REPLICATE_FIELDS

__all__ = ["LAYOUTS", "Layout", "config_label", "field_name", "layout_of", "layouts", "method_label", "sort_key",
           "value_text", "varying"]

Layout = Literal["lambda", "fewshot", "methods"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

# Settings listed first, in this order, wherever several are shown; the rest follow by name.
FIELD_ORDER = ("data.dataset", "model.arch", "method.name", "method.lam", "data.shots", "data.percent")
# Names that are not the field's own: the paper's symbols, and what a reader calls the others.
_NAMES = {"method.name": "method", "method.lam": "λ", "method.tau": "τ", "data.percent": "% labelled"}
_METHODS = get_args(MethodSpec.model_fields["name"].annotation)  # baseline first, as the spec lists them


def field_name(key: str) -> str:
    """``method.forward`` -> ``forward``; ``method.lam`` -> ``λ``; a top-level field (``seed``) as it is."""
    return _NAMES.get(key, key.partition(".")[2] or key)


def value_text(v: Any) -> str:
    """A setting's value in a cell: ``–`` for none, floats without trailing zeros."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def method_label(labels: Mapping[str, Any], *, with_lam: bool = True) -> str:
    """``baseline``, or the CGC variant with its λ: ``cgc λ=0.5``."""
    name = labels["method.name"]
    if name == "baseline" or not with_lam:
        return name
    return f"{name} λ={value_text(labels.get('method.lam'))}"


def config_label(labels: Mapping[str, Any], keys: Sequence[str], *, with_lam: bool = True) -> str:
    """The method (and λ), then ``name=value`` of each of ``keys``: ``cgc λ=0.5 forward=joint``.

    A baseline ignores the CGC-only settings, so they are not named after it.
    """
    shown = [k for k in keys if not (labels["method.name"] == "baseline" and k in CGC_ONLY_FIELDS)]
    return " ".join([method_label(labels, with_lam=with_lam)]
                    + [f"{field_name(k)}={value_text(labels.get(k))}" for k in shown])


def varying(label_sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value differs among the label sets that have them, :data:`FIELD_ORDER` first.

    A key some label sets lack counts as differing (the no-negatives' ``no_neg_scale``, which a cgc configuration
    does not read), except a CGC-only setting that only baselines lack.
    """
    keys = sorted({k for labels in label_sets for k in labels})
    vary = [k for k in keys if len({canonical(labels[k]) for labels in label_sets if k in labels}) > 1
            or any(k not in labels and not (k in CGC_ONLY_FIELDS and labels.get("method.name") == "baseline")
                   for labels in label_sets)]
    return [k for k in FIELD_ORDER if k in vary] + [k for k in vary if k not in FIELD_ORDER]


def sort_key(labels: Mapping[str, Any], keys: Sequence[str]) -> tuple:
    """Order of configurations: by each of ``keys``; methods in the spec's order, numbers by value, none first."""
    out = []
    for k in keys:
        v = labels.get(k)
        if k == "method.name":
            out.append((0, _METHODS.index(v) if v in _METHODS else len(_METHODS), str(v)))
        else:
            out.append((0 if v is None else 1, v if isinstance(v, (int, float)) else 0, str(v)))
    return tuple(out)


def layout_of(configs: Iterable[Mapping[str, Any]]) -> Layout:
    """The paper table an experiment is, from its trials' specs (a row stores its trial's, not the sweep's).

    - ``fewshot`` (Tables 7/8): a trial is few-shot (``data.shots`` set);
    - ``lambda`` (Table 10): ``method.lam`` is a sweep axis: two trials whose
      specs differ in λ alone, apart from the replicate axes (seed, episode) and
      where they ran (a CGC trial at λ = 0 is the ablation's baseline);
    - ``methods`` (Tables 1, 2, 5, 6, 9, 11): anything else.
    """
    lams: dict[str, set[str]] = {}
    for config in configs:
        flat = flatten(config)
        if flat.get("data.shots") is not None:
            return "fewshot"
        rest = {k: v for k, v in flat.items() if k != "method.lam" and k not in REPLICATE_FIELDS
                and k not in NON_IDENTITY_FIELDS and not k.startswith("sweep.")}
        lams.setdefault(canonical(rest), set()).add(canonical(flat.get("method.lam")))
    return "lambda" if any(len(values) > 1 for values in lams.values()) else "methods"


def layouts(table: pa.Table) -> dict[str, Layout]:
    """Experiment -> :func:`layout_of` its rows (columns ``experiment`` and ``config_json``).

    A row whose ``config_json`` is not a JSON object has no say (the statistics leave it out too).
    """
    configs: dict[str, list[dict[str, Any]]] = {}
    for experiment, text in zip(table["experiment"].to_pylist(), table["config_json"].to_pylist()):
        try:
            config = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(config, dict):
            configs.setdefault(experiment, []).append(config)
    return {experiment: layout_of(found) for experiment, found in configs.items()}
