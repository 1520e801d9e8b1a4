"""Evaluate saved models: top-1/5, Content Heatmap, IAUC, held-out CGC loss; one checkpoint, or an experiment's.

How each metric is measured is the spec's ``evaluation`` section, the same
settings a trial evaluates with (``train.trial.evaluator``), so a checkpoint
scored here and a trial's own row agree:

``ch_protocol="fast"``     batched centre crops at ``data.image_size``, boxes
                           moved into crop coordinates.
``ch_protocol="authors"``  the authors' measurement (docs/PAPER.md §3): batch 1,
                           image resized to ``ch_short_side`` (448) on its short side
                           without crop, the map of the GROUND-TRUTH class resized
                           bilinearly to the ORIGINAL image size, l1-normalised and
                           summed over the union of that class's boxes
                           (``train.engine.full_image_ch``).
``saliency``               Grad-CAM (the paper's CH) or contrastive excitation
                           backprop (``cmwp``, Table 4), ``saliency_window`` its head.

:func:`evaluate_checkpoint` scores one weights file into an ``evaluate`` row;
:func:`evaluate_experiment` scores the checkpoints of every finished trial of
an experiment on another dataset or by another protocol (Table 3: an
``imagenet`` sweep on UnRel) into rows that pair like the trials' own.
The model stays in eval mode throughout. Fractions are returned in [0, 1];
the rows hold the results table's units (% for top1/top5/ch). No Ray here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cgc_ray.config import HELDOUT_METRIC, ExperimentSpec, MethodSpec, SpecError, check_data_root, validate_spec
from cgc_ray.config.base import digest, set_path
from cgc_ray.config.identity import legacy_values, spec_hash, trial_id, with_legacy_values
from cgc_ray.config.spec import EvaluationSpec
from cgc_ray.data import ImageRecord, class_names, records
from cgc_ray.data import info as info_of
from cgc_ray.models.checkpoint import Classifier, load_classifier, method_record, read_header, weights_arch
from cgc_ray.storage import Storage
from cgc_ray.train.engine import full_image_ch
from cgc_ray.train.trial import data_root, evaluation_details, evaluator, full_image_loader, local_weights, \
    synthetic_options

def content_heatmap_authors(
    model: nn.Module,
    recs: Sequence[ImageRecord],
    *,
    layer: str = "layer4",
    short_side: int = 448,
    saliency: str = "gradcam",
    window: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Tensor:
    """CH in [0, 1] per record by the authors' protocol (module docstring); NaN where a record has no box
    (or, for (c)MWP, an all-zero map).

    recs: N ImageRecords (boxes in 0-based continuous coordinates of the
    original image). Returns Tensor[N] on the CPU; the model's mode is restored.
    """
    return full_image_ch(model, full_image_loader(recs, short_side, workers=num_workers), device, layer=layer,
                         saliency=saliency, window=window)


# --------------------------------------------------------------------------- evaluation


def checkpoint_spec(weights: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> ExperimentSpec:
    """The spec ``weights`` are evaluated under (``model.weights``): the spec's defaults, then what the
    checkpoint records (its architecture, else the one its tensors fit; its Grad-CAM layer; its image size),
    then ``settings`` (dotted field path -> value, e.g. ``{"data.dataset": "cub200"}``), which win."""
    weights, settings = str(weights), dict(settings or {})
    extra = read_header(weights).get("extra", {})
    recorded = {"model.arch": extra.get("arch") or (None if "model.arch" in settings else weights_arch(weights)),
                "model.layer": method_record(extra)[1], "data.image_size": extra.get("image_size")}
    tree = ExperimentSpec().model_dump(mode="json")
    for path, value in {"model.weights": weights, **recorded, **settings}.items():
        if value is not None or path in settings:
            set_path(tree, path, value)
    return validate_spec(tree)


def _subsample(recs: list[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """``limit`` records spread evenly over the split (classes are usually stored in order)."""
    if limit is None or limit >= len(recs):
        return recs
    if limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of images")
    return [recs[i * len(recs) // limit] for i in range(limit)]


def _num_classes(spec: ExperimentSpec) -> int:
    """Classes a classifier of ``data.dataset`` scores: its label space (UnRel: ImageNet's 1000), else its classes."""
    return info_of(spec.data.dataset).label_space or len(class_names(spec.data.dataset, data_root(spec),
                                                                     **synthetic_options(spec)))


def _classifier(spec: ExperimentSpec, num_classes: int) -> Classifier:
    """``model.weights`` as ``model.arch`` with the Grad-CAM layer ``model.layer``, checked against the dataset:
    a head for another number of classes would give meaningless predictions (ValueError)."""
    clf = load_classifier(spec.model.weights, arch=spec.model.arch, layer=spec.model.layer)
    if clf.num_classes != num_classes:
        raise ValueError(
            f"weights {clf.source} classify {clf.num_classes} classes but the evaluated dataset has {num_classes}; "
            "evaluate on the dataset the checkpoint was trained on"
        )
    return clf


def evaluate_checkpoint(spec: ExperimentSpec, *, limit: int | None = None,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Evaluate the classifier in ``spec.model.weights`` on ``data.eval_split`` of ``data.dataset``.

    ``spec`` (:func:`checkpoint_spec` builds one for a checkpoint) says what
    and how: ``metrics``, ``evaluation`` (the CH protocol and saliency, the
    IAUC protocol and input), ``seed``, ``model.layer``, and the data
    (``root``, ``image_size``, ``batch_size``, ``num_workers``, and for
    ``synthetic`` the generated set, at ``image_size`` as a trial generates
    it): the evaluation a trial runs (``train.trial.evaluator``). ``limit``:
    evaluate only this many images, spread evenly over the split.

    Returns a dict: the requested metrics as fractions in [0, 1] (cgc_loss in
    nats), n_eval, n_ch, zero_cam_frac, how CH and IAUC were measured
    (``train.trial.evaluation_details``), wall_time_s, epochs, and ``config``
    (data/model/method/evaluate settings, JSON-able) for :func:`result_row`.
    """
    start = time.perf_counter()
    dataset, root, options = spec.data.dataset, data_root(spec), synthetic_options(spec)
    split = spec.data.eval_split or info_of(dataset).eval_split
    recs = _subsample(records(dataset, root, split, **options), limit)
    if not recs:
        raise ValueError(f"split {split!r} of dataset {dataset!r} under {root} has no images")
    clf = _classifier(spec, _num_classes(spec))
    out: dict[str, Any] = evaluator(spec, recs, batch=spec.data.batch_size)(clf.model.to(torch.device(device)), device)
    out.update(evaluation_details(spec, out))
    out.update(wall_time_s=time.perf_counter() - start, epochs=clf.epochs, eval_split=split,
               config=_row_config(spec, clf, split=split, root=root, limit=limit))
    return out


def _row_config(spec: ExperimentSpec, clf: Classifier, *, split: str, root: str, limit: int | None) -> dict[str, Any]:
    """What an evaluation row records of what was evaluated, and how (:func:`evaluation_trial_id` hashes it)."""
    d, ev = spec.data, spec.evaluation
    method = None if clf.method is None else MethodSpec.model_validate(clf.method)
    # settings added later are recorded only away from their legacy value, so earlier rows keep their ids
    later = {name: getattr(ev, name) for name, legacy in dict(legacy_values(EvaluationSpec)).items()
             if name not in ("ch_protocol", "ch_short_side") and getattr(ev, name) != legacy}
    return {
        "data": {"dataset": d.dataset, "root": str(root), "split": split, "image_size": d.image_size,
                 "limit": limit, "shots": None, "episode": 0, "percent": None,
                 **({"synthetic": {"variant": d.synthetic.variant}} if d.dataset == "synthetic" else {})},
        "model": {"arch": clf.arch, "weights": _absolute(clf.source), "layer": clf.layer},
        "method": {"name": method.name, "lam": method.lam, "tau": method.tau} if method else
                  {"name": "unknown", "lam": 0.0, "tau": HELDOUT_METRIC.tau},
        "seed": spec.seed,
        "evaluate": {"protocol": ev.ch_protocol, "metrics": sorted(spec.metrics), "short_side": ev.ch_short_side,
                     "iauc_images": ev.iauc_images, "iauc_protocol": ev.iauc_protocol, "cgc_batch": ev.cgc_batch,
                     **later},
    }


def _absolute(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


# --------------------------------------------------------------------------- results row


def evaluation_trial_id(config: Mapping[str, Any]) -> str:
    """``eval-<12 hex>``: what was evaluated (weights, dataset, split, protocol, settings), not where the data sits."""
    ident = json.loads(json.dumps(config))
    ident["data"].pop("root", None)
    return f"eval-{digest(ident)}"


def result_row(result: Mapping[str, Any], *, node: str | None = None) -> dict[str, Any]:
    """A row for ``cgc_ray.results.table.write_row`` from :func:`evaluate_checkpoint`'s result.

    top1/top5/ch are converted to % (the table's unit); NaN metrics (e.g. CH
    on a dataset without boxes) become null.
    """
    config = result["config"]
    return _row(config, result, trial_id=evaluation_trial_id(config), spec_hash=digest(config), node=node)


def _row(config: Mapping[str, Any], result: Mapping[str, Any], *, trial_id: str, spec_hash: str,
         node: str | None = None) -> dict[str, Any]:
    from cgc_ray.results.table import DETAIL_COLUMNS, code_version, result_metrics, row_from_config

    return row_from_config(
        config,
        result_metrics(result),
        trial_id=trial_id,
        spec_hash=spec_hash,
        epochs=int(result["epochs"]),
        wall_time_s=float(result["wall_time_s"]),
        node=node or platform.node(),
        code_version=code_version(),
        details={k: result[k] for k in DETAIL_COLUMNS if result.get(k) is not None},
    )


# --------------------------------------------------------------------------- an experiment's checkpoints

# What scoring a trained model may change: what it is scored on and how, never how it was trained (a row
# claims its trial's training).
EVALUATION_SETTINGS: tuple[str, ...] = ("data.dataset", "data.root", "data.eval_split", "data.num_workers",
                                        "metrics", "evaluation")


def evaluate_experiment(storage: Storage | str, source: str, into: str, settings: Mapping[str, Any], *,
                        device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> list[str]:
    """Score the checkpoint of every finished trial of experiment ``source`` under ``settings``, one row per
    trial into experiment ``into`` (in the same storage); returns the paths of the rows written.

    ``settings``: dotted path -> value, under :data:`EVALUATION_SETTINGS`
    (e.g. ``{"data.dataset": "unrel", "data.root": DIR, "data.eval_split": None,
    "metrics": ["top1", "ch"]}``, Table 3). A row's config is its trial's
    config with ``settings`` applied and ``name=into``: its identity is the
    trial's with the evaluation's changes, so ``cgc-ray report --experiment
    into`` groups and pairs the rows as it does the trials (baseline and CGC of
    one seed). With another ``data.dataset`` the row names the dataset it was
    scored on; the one it was trained on is the one its head classifies
    (UnRel's label space is ImageNet-1k's), so a trial whose head does not fit
    is left out before its id is looked at: the 5-class demo trial of the same
    settings would otherwise share the id. Left out, each with a line to
    ``log``: those trials, trials without a checkpoint in storage, rows that
    are no trial of this version, and trials scored in ``into`` already
    (re-running continues).
    """
    storage = Storage.of(storage)
    bad = [p for p in settings if not any(p == s or p.startswith(s + ".") for s in EVALUATION_SETTINGS)]
    if bad:
        raise SpecError(f"cannot score trained trials with {bad}: a row keeps its trial's training; set only "
                        f"{', '.join(EVALUATION_SETTINGS)} (evaluation.*)")
    from cgc_ray.results.table import completed_trial_ids, read_rows, write_row

    rows = [r for r in read_rows(storage, source).to_pylist() if r["status"] in (None, "finished")]
    if not rows:
        raise ValueError(f"experiment {source!r} under {storage.uri} has no finished trials; run it first "
                         "(its rows and checkpoints must be in this storage)")
    say = log or (lambda _line: None)
    done, written = completed_trial_ids(storage, into), []
    for row in rows:
        try:
            target = _scored_trial(row["config_json"], settings, into, storage)
        except ValueError as e:  # SpecError too
            say(f"{source}/{row['trial_id']}: left out, not a trial config of this version ({e})")
            continue
        check_data_root(target)
        weights = _trial_checkpoint(target, source, row["trial_id"], say)  # first: see the docstring
        if weights is None:
            continue
        tid = trial_id(target)
        if tid in done:
            say(f"{source}/{row['trial_id']}: scored already ({into}/{tid})")
            continue
        scoring = validate_spec({**target.model_dump(mode="json"),
                                 "model": {**target.model.model_dump(mode="json"), "weights": weights}})
        result = evaluate_checkpoint(scoring, device=device)
        written.append(write_row(storage, into, _row(target.model_dump(mode="json"), result, trial_id=tid,
                                                     spec_hash=spec_hash(target))))
        done.add(tid)
        say(f"{source}/{row['trial_id']}: {into}/{tid} top1 {result.get('top1', float('nan')):.4f} "
            f"ch {result.get('ch', float('nan')):.4f}")
    return written


def _scored_trial(config_json: str, settings: Mapping[str, Any], into: str, storage: Storage) -> ExperimentSpec:
    """The trial a row records (a config written before a field existed means its legacy value), scored under
    ``settings`` as a trial of experiment ``into``."""
    tree = with_legacy_values(json.loads(config_json))
    tree.update(name=into, storage=storage.uri)
    for path, value in settings.items():
        set_path(tree, path, value)
    return validate_spec(tree)


def _trial_checkpoint(target: ExperimentSpec, source: str, tid: str, say: Callable[[str], None]) -> str | None:
    """A local copy of trial ``source/tid``'s checkpoint, if its head scores ``target``'s dataset; else None, said."""
    ref = validate_spec({**target.model_dump(mode="json"),
                         "model": {**target.model.model_dump(mode="json"), "weights": f"trial:{source}/{tid}"}})
    try:
        path = local_weights(ref)
    except SpecError as e:
        say(f"{source}/{tid}: left out, {e} (failure.keep_checkpoint=none keeps none)")
        return None
    trained, wanted = read_header(path).get("extra", {}).get("num_classes"), _num_classes(target)
    if trained is not None and trained != wanted:
        say(f"{source}/{tid}: left out, its head classifies {trained} classes, {target.data.dataset} needs {wanted}")
        return None
    return path
