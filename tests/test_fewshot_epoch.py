"""A few-shot trial trains on every image of its episode each epoch (issue 18, item 5).

The training loader drops only a final batch of one image (the contrastive loss needs two), never the rest
of a partial batch: with batch 256 the old ``drop_last = len(train) > batch`` trained 5-shot Aircraft
(500 images) and Flowers (510) on one step of 256 an epoch. Images are counted from the loader's batch
sampler (indices only: nothing is read from disk).
"""

from __future__ import annotations

import pytest
import torch

from cgc_ray import data as D
from cgc_ray.config import apply_overrides, load_spec
from cgc_ray.config.presets import PRESETS
from cgc_ray.data.synthetic import CLASS_SETS
from cgc_ray.train import trial as trial_mod
from cgc_ray.train.trial import TrialData, build_loaders, episode_seed

from test_protocols import REAL_COUNTS  # images per class in each split, from the datasets' own lists

CLASSES = {"cub200": 200, "cars196": 196, "aircraft": 100, "flowers102": 102}  # Aircraft: 100 variants
FEWSHOT_PRESETS = sorted(k for k, v in PRESETS.items() if load_spec(v).data.shots is not None)


def _pool(spec) -> list[D.ImageRecord]:
    """Records with the real number of images in each class of the episode pool (alternately the smallest
    and the largest class of each split); the paths are never opened."""
    ds = spec.data.dataset
    if ds == "synthetic":
        counts = [spec.data.synthetic.n_train_per_class] * len(CLASS_SETS[spec.data.synthetic.classes])
    else:
        counts = [sum(REAL_COUNTS[ds][s][c % 2] for s in D.info(ds).fewshot_pool) for c in range(CLASSES[ds])]
    return [D.ImageRecord(f"/nowhere/{c}/{i}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def _seen(loader) -> list[int]:
    """Sizes of one epoch's batches."""
    return [len(b) for b in loader.batch_sampler]


@pytest.fixture
def no_images(monkeypatch):
    """The embedded dataset is cached in memory when its loader is built: decode nothing."""
    monkeypatch.setattr("cgc_ray.data.dataset.decoded_image", lambda path: None)


def test_there_are_fewshot_presets():
    assert {f"fewshot_{ds}" for ds in CLASSES} | {"fewshot_demo"} == set(FEWSHOT_PRESETS)


@pytest.mark.parametrize("name", FEWSHOT_PRESETS)
def test_every_image_of_the_episode_is_seen_each_epoch(name, no_images):
    base = load_spec(PRESETS[name])
    for shots in base.sweep.grid["data.shots"]:
        spec = apply_overrides(base, [f"data.shots={shots}", "sweep.grid={}"])
        train, val = D.episode(_pool(spec), shots, episode_seed(spec))
        n_classes = len({r.label for r in train + val})
        assert n_classes == (CLASSES.get(spec.data.dataset) or len(CLASS_SETS["novel"]))
        loader, _ = build_loaders(spec, TrialData(train, val, None, n_classes, episode_seed(spec), "rest"))
        sizes = _seen(loader)
        # shots x classes is never 1 more than a multiple of the batch here: every image, every epoch
        assert sum(sizes) == len(train) == shots * n_classes, (name, shots, sizes)
        assert len(sizes) == -(-len(train) // spec.data.batch_size) and min(sizes) >= 2


def _loader_of(n: int, batch: int, *overrides: str):
    spec = apply_overrides(load_spec(PRESETS["fewshot_cub200"]), [f"data.batch_size={batch}", "sweep.grid={}",
                                                                  *overrides])
    recs = [D.ImageRecord(f"/nowhere/{i}.jpg", i % 2) for i in range(n)]
    return spec, TrialData(recs, [], None, 2, None, "test")


@pytest.mark.parametrize("n, batch, sizes", [(257, 256, [256]), (258, 256, [256, 2]), (256, 256, [256]),
                                             (500, 256, [256, 244]), (3, 2, [2]), (2, 256, [2])])
def test_only_a_final_batch_of_one_is_dropped(n, batch, sizes):
    spec, td = _loader_of(n, batch)
    assert _seen(build_loaders(spec, td)[0]) == sizes


@pytest.mark.parametrize("n, sizes_per_rank", [
    (600, [256, 44]),  # 300 a rank: nothing dropped
    (514, [256]),      # 257 a rank: each rank drops its final batch of one
    (513, [256]),      # 257 and 256 (padded to 257): the sampler drops the odd image, no batch of one is left
    (4, [2]),
])
def test_every_rank_drops_alike_under_ddp(n, sizes_per_rank, monkeypatch):
    """Two ranks, global batch 512 (256 a rank): the same batches, never one of one image, on both ranks."""
    spec, td = _loader_of(n, 512, "scaling.num_workers=2", "scaling.use_gpu=false")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    seen = set()
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = build_loaders(spec, td, distributed=True)[0]
        assert _seen(loader) == sizes_per_rank
        seen |= {i for b in loader.batch_sampler for i in b}
    assert len(seen) >= n - 2  # at most one image a rank left out
