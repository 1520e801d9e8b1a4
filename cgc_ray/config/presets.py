"""The paper's experiments and their demo-scale versions, as spec trees (validated where they are loaded).

Every value of a paper preset is written next to its source, and :data:`SOURCES` keeps them (preset ->
dotted path -> source): ``paper: ...`` (a table, or what docs/PAPER.md §2 records the paper stating),
``authors: file:line`` (UCDvision/CGC at a66d872, the code behind the paper's tables) or ``assumed: why``
where neither states the value. The ``*_demo`` presets are the same experiments at CPU scale on the
embedded data; their comments say how their own values were chosen.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

Sourced = dict[str, tuple[Any, str]]  # dotted spec path -> (value, where the value comes from)


def _preset(name: str, *layers: Sourced) -> tuple[dict[str, Any], dict[str, str]]:
    """(spec tree, path -> source) of a paper preset; a later layer replaces a path's value and source."""
    flat = {path: entry for layer in layers for path, entry in layer.items()}
    tree: dict[str, Any] = {"name": name}
    for path, (value, _) in flat.items():
        *sections, leaf = path.split(".")
        node = tree
        for key in sections:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    return tree, {path: source for path, (_, source) in flat.items()}


def _with_source(layer: Sourced, paths: tuple[str, ...], source: str) -> Sourced:
    """The same values of ``paths``, with another source."""
    return {p: (layer[p][0], source) for p in paths}


def _mergeable(old: Any, new: Any) -> bool:
    """Dicts merge, except members of a discriminated union (e.g. optim.schedule) of another kind."""
    if not (isinstance(old, dict) and isinstance(new, Mapping)):
        return False
    return "name" not in new or old.get("name") == new["name"]


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if _mergeable(out.get(k), v) else copy.deepcopy(v)
    return out


_RESOURCES = "assumed: resources, not results (left out of the trial id)"
_METRICS = "paper: top-1 and CH (most tables), top-5 (Table 9), IAUC (Table 2), the held-out CGC loss (Table 1)"

# ImageNet from scratch: what the paper states (docs/PAPER.md §2) and the authors' one ImageNet command runs
# (README.md:36: train_eval_cgc.py -a resnet50 -b 256 --lr 0.1 --lambda 0.5 -t 0.5, the rest its defaults).
_IMAGENET: Sourced = {
    "data.dataset": ("imagenet", "paper: Tables 1, 2, 5, 10"),
    "data.image_size": (224, "authors: datasets/imagefolder_cgc_ssl.py:147,159, RandomResizedCrop(224) and T to 224"),
    "data.batch_size": (256, "paper (docs/PAPER.md §2); authors: README.md:36 -b 256"),
    "model.arch": ("resnet18", "paper: Table 1"),
    "model.weights": (None, "paper: ImageNet from scratch (docs/PAPER.md §2)"),
    "model.layer": ("layer4", "authors: models/resnet_multigpu_cgc.py:277, Grad-CAM of layer4's output"),
    "method.name": ("cgc", "paper: CGC"),
    "method.lam": (1.0, "paper: λ 1.0 for ResNet18 (docs/PAPER.md §2)"),
    "method.tau": (0.5, "paper: τ 0.5 (docs/PAPER.md §2); authors: README.md:36 -t 0.5"),
    "optim.lr": (0.1, "paper (docs/PAPER.md §2); authors: README.md:36 --lr 0.1"),
    "optim.momentum": (0.9, "paper (docs/PAPER.md §2); authors: train_eval_cgc.py:75 default"),
    "optim.weight_decay": (1e-4, "paper (docs/PAPER.md §2); authors: train_eval_cgc.py:77 default"),
    "optim.epochs": (90, "paper (docs/PAPER.md §2); authors: train_eval_cgc.py:64 default"),
    "optim.schedule": ({"name": "step", "milestones": [30, 60], "gamma": 0.1},
                       "paper: lr x0.1 every 30 epochs (docs/PAPER.md §2); authors: train_eval_cgc.py:495"),
    "metrics": (["top1", "top5", "ch", "iauc", "cgc_loss"], _METRICS),
    # CH and IAUC as the authors measured them: TorchRay's CH script on the whole image (-b 1 --input_resize 448:
    # README.md:69 ImageNet, :74 CUB, :79 SwAV 1 %) and RISE's insertion game on images squashed to 224 x 224
    "evaluation.ch_protocol": ("authors", "authors: README.md:69,74,79, TorchRay's *_gradcam_energy_inside_bbox.py "
                                          "-b 1 on the whole image, the ground-truth class, the union of its boxes"),
    "evaluation.ch_short_side": (448, "authors: README.md:69,74,79 --input_resize 448"),
    "evaluation.iauc_input": ("squash", "authors: RISE/evaluate_auc_metrics.py:55 ImageFolder(val, preprocess), "
                                        "RISE/utils.py:46-47 preprocess = Resize((224, 224))"),
    # the authors train in fp32: fp16 autocast through the CAM is not shown to give their loss and gradients
    "scaling.amp": (False, "authors: fp32, train_eval_cgc.py has no autocast or half precision"),
    "eval_every": (10, "assumed: the paper reports the final model (always evaluated); IAUC alone runs 29 forwards "
                       "an image over the 50,000 val images, about a training epoch's forwards, so every epoch "
                       "would double the cost; every 10th gives the curve"),
    # one GPU per trial worker with 8 CPUs: 7 DataLoader processes feed it (cluster/gpu.yaml's 4-GPU type has
    # 12 CPUs per GPU); ImageNet DDP adds --set scaling.num_workers=4
    "scaling.cpus_per_worker": (8, _RESOURCES),
    "scaling.gpus_per_worker": (1, _RESOURCES),
}
_RECIPE = ("data.batch_size", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.epochs", "optim.schedule")

# The authors' training step (UCDvision/CGC at a66d872): what their train_eval_cgc.py computes per step, which
# is what the paper's numbers came from. tests/test_authors_step.py shows the product computes it (same loss and
# parameter gradients as an independent re-implementation of their step). The paper presets train with it; the
# demos keep the spec's defaults (the paper's equation, one CE term), their own experiment. The README ("The
# authors' step") says what it means for λ: three CE terms, so a paper λ weighs CGC ~3x less than with one.
_MODEL_PY = "models/resnet_multigpu_cgc.py"
AUTHORS_STEP: Sourced = {
    "method.ce_views": (3, f"authors: {_MODEL_PY}:252, xe_loss = CE(xe) + CE(images) + CE(aug)"),
    "method.forward": ("separate", f"authors: {_MODEL_PY}:229,232,238, one forward_vanilla per view"),
    "method.view": ("center", "authors: datasets/imagefolder_cgc_ssl.py:152-159, T's crop drawn on and applied "
                              "to the Resize(256) + CenterCrop(224) view"),
    "method.anchor": ("authors", f"authors: {_MODEL_PY}:257-261, positive aug.orig_aug, negatives aug.aug"),
    # the paper's cost note names 2 Titan-RTX (128 a chunk); the one released ImageNet command runs 4 GPUs
    "method.negatives_group": (64, "authors: README.md:36, CUDA_VISIBLE_DEVICES=0,1,2,3 with -b 256 under "
                                   "nn.DataParallel (train_eval_cgc.py:236): chunks of 64 a GPU"),
    "method.zero_cam": ("uniform", "authors: models/utils.py:44, m / (m.sum() + 1e-8) + 1e-8"),
    "method.cam_transform": ("upsampled", "authors: models/utils.py:40, F.interpolate to 224, then :64-68 slice "
                                          "the crop box of that map and resize it"),
}

# Tables 1, 5 and 11: the baseline, CGC and CGC without negatives, one sweep. Without negatives, the authors'
# term is F.mse_loss of the two l2-normalised maps (models/resnet_multigpu_cgc.py:255), a mean over 224 x 224
# pixels, ~4e-6 on a fresh network; the paper (Table 5) swaps the term and states no other λ. Their scripts'
# --lambda default of 1000 (train_eval_gc_l2_no_contrast_baseline.py:114) is no setting: train_eval_cgc.py
# has the same default, which its own README command overrides to 0.5. So the term here is the squared l2
# distance summed over pixels (method.no_neg_scale "sum", 2 - 2 cos, independent of the image size) at the
# CGC λ of the preset: at initialisation it moves the weights 0.3-0.4x as much as the three CE terms, where
# the mean moved them 1e-5x as much at λ 1 and <1 % at λ 1000 (tests/test_presets_sources.py measures them).
_NO_NEG = {"method.name": "cgc_no_neg", "method.no_neg_scale": "sum"}
_THREE_METHODS: Sourced = {
    "sweep.variants": ([{"method.name": "baseline"}, {}, _NO_NEG],
                       "paper: Tables 1, 5, 11 (baseline, CGC, CGC without negatives); without negatives: "
                       "paper: Table 5, the l2 distance of the normalised maps at the CGC λ (no other λ "
                       "stated); assumed: summed over pixels, as the authors' mean at their λ would not move "
                       "the weights (models/resnet_multigpu_cgc.py:255)"),
}

# Fine-grained and few-shot: ImageNet-pretrained ResNet50, all layers fine-tuned (the paper). The recipe is
# assumed: the paper states none for them, and the authors released no command.
_FINETUNE_RECIPE = _with_source(_IMAGENET, _RECIPE, (
    "assumed: the paper states no fine-grained or few-shot recipe and the authors released no command; these "
    "are train_eval_cgc.py's defaults (lines 64-77, 495), what it runs for --dataset cub --pretrained alone"))
_R50_IMAGENET: Sourced = {
    "model.arch": ("resnet50", "paper: ImageNet-pretrained ResNet50, all layers fine-tuned (docs/PAPER.md §2)"),
    "model.weights": ("ResNet50_Weights.IMAGENET1K_V1",
                      "authors: models/resnet_multigpu_cgc.py:19, --pretrained loads torchvision's "
                      "resnet50-19c8e357.pth (IMAGENET1K_V1)"),
}
# train_eval_cgc.py's step (it has --dataset cub etc.), on as many GPUs as their ImageNet command
_FINETUNE_STEP = _with_source(AUTHORS_STEP, ("method.negatives_group",), (
    "assumed: the 64 images a GPU of the authors' ImageNet command (README.md:36); they released no fine-grained "
    "or few-shot command"))
_FINEGRAINED_LAM = {"cub200": 0.25, "cars196": 0.25, "aircraft": 0.5, "flowers102": 0.5}
_FEWSHOT_LAM = {"cub200": 0.8, "cars196": 0.8, "aircraft": 0.6, "flowers102": 0.8}

PRESETS: dict[str, dict[str, Any]] = {}
SOURCES: dict[str, dict[str, str]] = {}


def _add(key: str, name: str, *layers: Sourced) -> None:
    PRESETS[key], SOURCES[key] = _preset(name, *layers)


_add("imagenet_r18", "imagenet", _IMAGENET, AUTHORS_STEP, _THREE_METHODS)
_add("imagenet_r50", "imagenet", _IMAGENET, AUTHORS_STEP, _THREE_METHODS, {
    "model.arch": ("resnet50", "paper: Table 1"),
    "method.lam": (0.5, "paper: λ 0.5 for ResNet50 (docs/PAPER.md §2); authors: README.md:36 --lambda 0.5"),
})
_add("imagenet100_r50", "imagenet100", _IMAGENET, AUTHORS_STEP, _THREE_METHODS, _with_source(_IMAGENET, _RECIPE, (
    "assumed: the ImageNet recipe; docs/PAPER.md §2 records none for ImageNet-100")), {
    "data.dataset": ("imagenet100", "paper: Table 11"),
    "model.arch": ("resnet50", "paper: Table 11"),
    "method.lam": (0.5, "assumed: ResNet50's ImageNet λ; docs/PAPER.md §2 records none for ImageNet-100"),
})
_add("lambda_ablation", "lambda_ablation", _IMAGENET, AUTHORS_STEP, {
    "sweep.grid": ({"method.lam": [0.0, 0.01, 0.1, 0.5, 1.0, 2.0]}, "paper: Table 10"),
})
_SEMISUP = "train_imagenet_1pc_swav_cgc_unlabeled.py"  # README.md:44 is the authors' command for Table 9
_SWAV_PY = "models/swav_resnet_cgc.py"
_add("semisup", "semisup", _IMAGENET, AUTHORS_STEP, {
    # the same step on the unlabelled batch (models/utils.py, datasets/imagefolder_cgc_ssl.py via line 24, 290),
    # one CE term on the labelled batch, DataParallel on 2 GPUs
    "method.ce_views": (1, f"authors: {_SWAV_PY}:368, xe_loss = CE of the labelled batch alone"),
    "method.forward": ("separate", f"authors: {_SWAV_PY}:340,343,348, one forward_vanilla per view"),
    "method.anchor": ("authors", f"authors: {_SWAV_PY}:360-364, positive aug.orig_aug, negatives aug.aug"),
    "method.negatives_group": (64, f"authors: README.md:44, CUDA_VISIBLE_DEVICES=0,1 with -b 128 under "
                                   f"nn.DataParallel ({_SEMISUP}:246): chunks of 64 a GPU"),
    "data.dataset": ("imagenet", "paper: Table 9"),
    "data.percent": (1.0, "paper: Table 9, 1 % of ImageNet train labelled"),
    # the standard 1percent.txt list (in the ImageNet folder, or data.split_file), never a random draw
    "data.labelled": ("list", "paper: the standard 12,811-image 1percent.txt (docs/PAPER.md §2)"),
    "data.batch_size": (128, "authors: README.md:44 -b 128"),
    "data.image_size": (224, f"authors: {_SEMISUP}:284,293, RandomResizedCrop(224)"),
    "model.arch": ("resnet50", "paper: Table 9; authors: README.md:44 -a resnet50"),
    "model.weights": ("swav:swav_800ep_pretrain.pth.tar", "paper: SwAV init; authors: README.md:41, 800 epochs"),
    "method.lam": (0.25, "authors: README.md:44 --lambda 0.25"),
    "method.tau": (0.5, "authors: README.md:44 -t 0.5"),
    "optim.lr": (0.02, "authors: README.md:44 --lr 0.02 (the trunk)"),
    "optim.head_lr": (5.0, "authors: README.md:44 --lr_last_layer 5"),
    "optim.momentum": (0.9, f"authors: {_SEMISUP}:264"),
    "optim.weight_decay": (0.0, f"authors: {_SEMISUP}:265"),
    "optim.epochs": (50, "authors: README.md:44 --epochs 50"),
    "optim.schedule": ({"name": "step", "milestones": [12, 16], "gamma": 0.2},
                       f"authors: {_SEMISUP}:112,114 defaults, MultiStepLR at line 268"),
    "sweep.grid": ({"method.name": ["baseline", "cgc"]}, "paper: Table 9"),
})
for _ds, _lam in _FINEGRAINED_LAM.items():
    _add(f"finegrained_{_ds}", "finegrained", _IMAGENET, AUTHORS_STEP, _FINETUNE_STEP, _FINETUNE_RECIPE,
         _R50_IMAGENET, {
        "data.dataset": (_ds, "paper: Table 6"),
        "method.lam": (_lam, "paper: λ for full fine-grained data (docs/PAPER.md §2)"),
        "sweep.grid": ({"method.name": ["baseline", "cgc"], "seed": [0, 1, 2]}, "paper: Table 6, 3 trials"),
        "scaling.cpus_per_worker": (4, _RESOURCES + ": one trial per single-GPU node (4 CPUs)"),
    })
for _ds, _lam in _FEWSHOT_LAM.items():
    _add(f"fewshot_{_ds}", "fewshot", _IMAGENET, AUTHORS_STEP, _FINETUNE_STEP, _FINETUNE_RECIPE, _R50_IMAGENET, {
        "data.dataset": (_ds, "paper: Tables 7, 8"),
        "data.shots": (1, "paper: n in {1, 5, 10} images per class (the sweep sets it)"),
        "method.lam": (_lam, "paper: λ for few-shot (docs/PAPER.md §2)"),
        "sweep.grid": ({"method.name": ["baseline", "cgc"], "data.shots": [1, 5, 10], "data.episode": list(range(20))},
                       "paper: 1/5/10 shots x 20 episodes, the same episode for baseline and CGC (docs/PAPER.md §2)"),
        "scaling.cpus_per_worker": (1, _RESOURCES + ": four small trials share a GPU"),
        "scaling.gpus_per_worker": (0.25, _RESOURCES),
    })
# Not a paper experiment: the fine-tuning experiments (Tables 6-8) at scale where no ImageNet-pretrained weights
# are at hand. Pretrain a ResNet50 with cross-entropy on ImageNet-100 with this product, then fine-tune from it
# (`--set model.weights=experiment:pretrain_imagenet100`).
_PRETRAIN = "assumed: a cross-entropy backbone for fine-tuning, not a paper experiment"
_add("pretrain_imagenet100", "pretrain", {k: v for k, v in _IMAGENET.items() if not k.startswith("method.")},
     _with_source(_IMAGENET, _RECIPE, _PRETRAIN), {
    "data.dataset": ("imagenet100", _PRETRAIN),
    "model.arch": ("resnet50", _PRETRAIN),
    "method.name": ("baseline", _PRETRAIN),
    "optim.epochs": (100, _PRETRAIN),
    "optim.schedule": ({"name": "cosine"}, _PRETRAIN),
    "metrics": (["top1", "top5", "ch"], _PRETRAIN),
})

# The demo scale: embedded synthetic data (1,500 training images of 5 shape classes among
# distractors), the small CPU net at 64 px. Tuned on the 2-core CPU: cross-entropy reaches
# ~71 % test top-1 in 20 epochs (~3.5 s/epoch per core); mild training crops (0.85-1 of the
# area) and CGC crops of 0.3-1 so T keeps the object, as in the pilots. The demos keep the spec's fp16
# autocast on a GPU (they are compared with each other, not with the paper's fp32 numbers).
_DEMO = {
    "data": {"dataset": "synthetic", "image_size": 64, "batch_size": 64, "num_workers": 0,
             "train_crop_scale": [0.85, 1.0]},
    "model": {"arch": "resnet_small", "weights": None},
    "method": {"crop_scale": [0.3, 1.0]},
    "optim": {"lr": 0.05, "nesterov": True, "weight_decay": 1e-4, "epochs": 20, "schedule": {"name": "onecycle"}},
    "scaling": {"cpus_per_worker": 1, "gpus_per_worker": 0.25, "amp": True},
    "metrics": ["top1", "ch", "cgc_loss"],
    # the batched centre-crop CH and IAUC: fast at 64 px, and the demos are compared with each other
    "evaluation": {"ch_protocol": "fast", "iauc_input": "center_crop"},
    "eval_every": 5,
}



def _our_step(tree: dict[str, Any]) -> dict[str, Any]:
    """A paper preset without the settings of :data:`AUTHORS_STEP`: the spec's defaults (the paper's equation,
    one CE term), the step the demos were tuned and measured with (README, "Where the accuracy goes")."""
    out = copy.deepcopy(tree)
    for path in AUTHORS_STEP:
        out["method"].pop(path.removeprefix("method."), None)
    return out


PRESETS.update(
    {
        "imagenet_demo": _merge(_our_step(PRESETS["imagenet_r18"]), _DEMO),
        "lambda_ablation_demo": _merge(
            _merge(_our_step(PRESETS["lambda_ablation"]), _DEMO),
            {"method": {"lam": 0.5}, "sweep": {"grid": {"method.lam": [0.0, 0.5, 1.0], "seed": [0, 1]}}},
        ),
    }
)

# The demos of the paper's fine-tuning experiments (Tables 6-9) start, as the paper does, from a pretrained
# network: `pretrain_demo` trains the small ResNet with cross-entropy on the 10 *base* shapes (no class shared
# with the 5 *novel* shapes the demos fine-tune on), the demos' stand-in for an ImageNet-pretrained backbone.
# `experiment:pretrain_demo` runs it once, in the demos' storage, the first time a demo needs it.
PRETRAINED_DEMO = "experiment:pretrain_demo"
PRESETS["pretrain_demo"] = _merge(_DEMO, {
    "name": "pretrain",
    "data": {"synthetic": {"classes": "base", "n_train_per_class": 400, "n_test_per_class": 50}},
    "method": {"name": "baseline"},
    "optim": {"epochs": 30},
    "scaling": {"cpus_per_worker": 2},  # one trial: both cores
    "metrics": ["top1", "ch"],
    "eval_every": 10,
})
# λ of each fine-tuning demo, chosen on data its README table never reports: λ in {0.1, 0.25, 0.5, 1} against the
# baseline, paired, few-shot on an independently generated copy of the images (data.synthetic.seed=1, episodes
# 0-4 at 1/5/10 shots), fine-grained and semisup on the validation split (data.eval_split=val, 150 images per
# class, seeds 0-2). Rule: the best mean validation top-1 (few-shot: the mean of the per-shot paired Δ); among
# the λ within 0.5 points of it, the highest CH. Validation top-1 / CH:
#   few-shot Δtop-1 over 1/5/10 shots: λ 0.1 +3.1, 0.25 +4.3, 0.5 +5.5, 1 +3.6           -> λ 0.5
#   fine-grained top-1 97.7 / 97.7 / 97.7 / 97.6 (every λ ties), CH 52.4 / 56.2 / 61.5 / 72.5 -> λ 1
#   semisup top-1 72.5 / 71.7 / 70.3 / 70.8 (baseline 71.6, ±5-8 between seeds)               -> λ 0.1
_FINETUNE_DEMO = {  # all layers fine-tuned from the pretrained backbone, a smaller learning rate
    "model": {"weights": PRETRAINED_DEMO},
    "optim": {"lr": 0.01, "schedule": {"name": "cosine"}},
    "eval_every": 100,  # the last epoch only
}
PRESETS.update(
    {
        "finegrained_demo": _merge(_merge(_merge(_our_step(PRESETS["finegrained_cub200"]), _DEMO), _FINETUNE_DEMO), {
            "method": {"lam": 1.0},
            "optim": {"epochs": 10},
            "sweep": {"grid": {"seed": [0, 1, 2]}},
        }),
        "fewshot_demo": _merge(_merge(_merge(_our_step(PRESETS["fewshot_cub200"]), _DEMO), _FINETUNE_DEMO), {
            # the rest of each class (60 - shots) is the evaluation set, as the paper's protocol
            "data": {"shots": 5, "batch_size": 64, "synthetic": {"n_train_per_class": 60}},
            "method": {"lam": 0.5},
            "optim": {"epochs": 30},
            "sweep": {"grid": {"data.shots": [1, 5, 10], "data.episode": list(range(10))}},
        }),
        "semisup_demo": _merge(_merge(_merge(_our_step(PRESETS["semisup"]), _DEMO), _FINETUNE_DEMO), {
            # 5 % labelled (15 per class), all 300 per class unlabelled for the CGC term; 10 seeds (each a new
            # labelled draw and init): a trial takes seconds and the seed-to-seed spread is ±5 points
            "data": {"percent": 5.0, "batch_size": 32, "labelled": "random"},
            "method": {"lam": 0.1},
            "optim": {"head_lr": None, "weight_decay": 1e-4, "epochs": 10},
            "sweep": {"grid": {"seed": list(range(10))}},
        }),
    }
)

# Where CGC's accuracy cost at demo scale comes from: one factor at a time against the demo's CGC (λ 0.5),
# paired by seed with the baseline, scored on a validation split (the test split is kept for the README's tables;
# the defaults are chosen here). `python experiments/ablation.py` runs the 5-seed core, then the 2-seed rest.
_ABLATION_BASE = _merge(PRESETS["lambda_ablation_demo"], {
    "name": "ablation",
    "data": {"eval_split": "val", "synthetic": {"n_val_per_class": 150}},
    "method": {"lam": 0.5},
    "sweep": {"grid": {"seed": [0, 1, 2, 3, 4]}},
})
_ABLATION_BASE["sweep"]["grid"] = {"seed": [0, 1, 2, 3, 4]}
_AUTHORS_VARIANT = {path: value for path, (value, _) in AUTHORS_STEP.items()}
PRESETS["ablation_demo"] = _merge(_ABLATION_BASE, {"sweep": {"variants": [
    {},
    {"method.name": "baseline"},
    {"method.forward": "separate"},
    {"method.view": "center"},
    {"method.forward": "separate", "method.view": "center"},  # the authors' forwards and view alone
    {"method.lam": 0.1},
    {"method.lam": 1.0},
    {"optim.epochs": 40},
    {"optim.epochs": 40, "method.name": "baseline"},
    {"method.lam": 1.0, "method.lam_normalization": "imagenet"},
    _AUTHORS_VARIANT,  # the authors' whole step (three CE terms: λ weighs CGC ~3x less), at λ 0.5 and 1
    {**_AUTHORS_VARIANT, "method.lam": 1.0},
    {"method.view": "center", "method.ce_views": 3},  # their three CE terms alone (issue 18 item 2)
    {"method.view": "center", "method.ce_views": 3, "method.lam": 1.0},
]}})
PRESETS["ablation_more_demo"] = _merge(_ABLATION_BASE, {"sweep": {"grid": {"seed": [0, 1]}, "variants": [
    {"method.crop_scale": [0.08, 1.0]},
    {"method.resolution": "feature"},
    {"method.lam": 0.25},
    {"method.tau": 0.2},
    {"method.tau": 1.0},
    {"method.cam_class": "label"},
]}})
# the same λ, raw and normalised to ImageNet's loss ratio, on the 10 base classes: does a normalised λ carry over?
PRESETS["ablation_base_demo"] = _merge(_ABLATION_BASE, {
    "data": {"synthetic": {"classes": "base"}},
    "sweep": {"grid": {"seed": [0, 1]}, "variants": [
        {"method.name": "baseline"},
        {},
        {"method.lam": 1.0, "method.lam_normalization": "imagenet"},
    ]},
})

# λ chosen by a search instead of by hand (experiments/lambda_search.py), on the fine-grained demo: fine-tuning
# from the pretrained backbone, where the paper hand-picks λ per dataset (Table 6: 0.25 / 0.5) and where CGC does
# not cost top-1, so a rule "the most CH for at most `tolerance` points of top-1" has a choice to make. (From
# scratch, at the demos' 20 epochs, CGC costs top-1 at every λ and the rule kept the baseline: README, "Choosing λ
# by a search".) Scored on the validation split (150 images per class, as the λ of every fine-tuning demo was
# chosen above), 3 seeds as replicates (assumed: the seeds of the grid it is compared with). τ is not searched:
# τ 0.2 and 1 moved neither top-1 nor CH clearly against τ 0.5 (README, "Where the accuracy goes"). Sources:
_SEARCH_DEMO = _merge(PRESETS["finegrained_demo"], {
    "name": "lambda_search",
    "data": {"eval_split": "val", "synthetic": {"n_val_per_class": 150}},
    "sweep": {"grid": {"seed": [0, 1, 2]}, "search": {
        # assumed: the grid λ 0.1-1 of the fine-tuning demos' choice (above) widened 5x below and 2x above,
        # log-uniform since λ's effect is multiplicative (fine-grained validation CH 52 / 56 / 62 / 73 at 0.1-1)
        "space": {"method.lam": {"loguniform": [0.02, 2.0]}},
        "algorithm": "optuna_multi",  # assumed: the rule reads the top-1/CH trade-off, which Optuna's front learns
        "num_samples": 12,  # issue 21: a budget of at most 12 trials (4 points x 3 seeds)
        "seed": 0,  # assumed: any fixed seed, so that a re-run samples the same points
        # assumed: ASHA prunes by validation CH, the rule's objective: fine-grained validation top-1 ties at every
        # λ (97.7 / 97.7 / 97.7 / 97.6 above), so pruning by it would stop trials at random
        "metric": "ch",
        "scheduler": "asha",  # issue 21: ASHA
        # assumed: rungs at epochs 2 and 6 of 10 (a third survives each), so that the search spends under half of
        # the grid's 120 trial-epochs; validation is scored every 2nd epoch for it
        "grace_period": 2,
        "reduction_factor": 3,
        # the default tolerance (1 point: fine-grained top-1 varies ±0.4 between seeds, README); one pair suffices
        # (assumed: ASHA stops trials one seed at a time, so two finished seeds of one λ are rare; the test split
        # re-runs the pick at every seed)
        "selection": {"min_pairs": 1},
    }},
    "eval_every": 2,
})
_SEARCH_DEMO["sweep"]["grid"] = {"seed": [0, 1, 2]}  # not the fine-grained demo's baseline/CGC axis: λ = 0 is it
PRESETS["lambda_search_demo"] = _SEARCH_DEMO

# The paper table each preset reproduces (a *_demo preset: at demo scale), listed by `cgc-ray presets`.
PRESET_TABLES: dict[str, str] = {
    "imagenet_r18": "Tables 1, 2, 5",
    "imagenet_r50": "Tables 1, 2, 5",
    "imagenet100_r50": "Table 11",
    "lambda_ablation": "Table 10",
    "semisup": "Table 9",
    **{f"finegrained_{ds}": "Table 6" for ds in _FINEGRAINED_LAM},
    **{f"fewshot_{ds}": "Tables 7, 8" for ds in _FEWSHOT_LAM},
    "imagenet_demo": "Tables 1, 2, 5",
    "lambda_ablation_demo": "Table 10",
    "pretrain_imagenet100": "none: a backbone to fine-tune from",
    "pretrain_demo": "none: the demos' backbone",
    "finegrained_demo": "Table 6",
    "fewshot_demo": "Tables 7, 8",
    "semisup_demo": "Table 9",
    "ablation_demo": "none: README ablation",
    "ablation_more_demo": "none: README ablation",
    "ablation_base_demo": "none: README ablation",
    "lambda_search_demo": "none: λ chosen on validation data",
}
