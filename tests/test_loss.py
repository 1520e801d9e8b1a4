"""The CGC loss: exact values against a hand-written reference, and its invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from cgc_ray.method.loss import cgc_loss


def reference(k, q, tau, anchor="paper"):
    """A deliberately naive loop over queries, straight from the paper's equation."""
    B = k.shape[0]
    k = [v.flatten() for v in k.double()]
    q = [v.flatten() for v in q.double()]
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
    total = 0.0
    for i in range(B):
        if anchor == "paper":
            pos = math.exp(cos(q[i], k[i]) / tau)
            den = sum(math.exp(cos(q[i], k[j]) / tau) for j in range(B))
        else:
            pos = math.exp(cos(k[i], q[i]) / tau)
            den = pos + sum(math.exp(cos(k[i], k[j]) / tau) for j in range(B) if j != i)
        total += -math.log(pos / den)
    return total / B


def test_identical_maps_for_all_images_give_log_b():
    m = torch.rand(1, 7, 7).expand(6, 7, 7)
    assert cgc_loss(m, m, tau=0.5).item() == pytest.approx(math.log(6), abs=1e-6)
    assert cgc_loss(m, m, tau=0.5, anchor="authors").item() == pytest.approx(math.log(6), abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("anchor", ["paper", "authors"])
def test_matches_hand_written_reference(tau, anchor):
    torch.manual_seed(0)
    k, q = torch.rand(5, 4, 6), torch.rand(5, 4, 6)
    assert cgc_loss(k, q, tau=tau, anchor=anchor).item() == pytest.approx(reference(k, q, tau, anchor), rel=1e-5)


def test_paper_and_authors_anchors_differ():
    torch.manual_seed(1)
    k, q = torch.rand(8, 5, 5), torch.rand(8, 5, 5)
    assert abs(cgc_loss(k, q).item() - cgc_loss(k, q, anchor="authors").item()) > 1e-4


def test_without_negatives_is_l2_between_normalised_positives():
    torch.manual_seed(2)
    k, q = torch.rand(4, 3, 3), torch.rand(4, 3, 3)
    ref = (F.normalize(k.flatten(1), dim=1) - F.normalize(q.flatten(1), dim=1)).pow(2).sum(1).mean()
    assert cgc_loss(k, q, negatives=False).item() == pytest.approx(ref.item(), rel=1e-6)
    assert cgc_loss(q, q, negatives=False).item() == pytest.approx(0.0, abs=1e-6)
    one = (F.normalize(k[:1].flatten(1), dim=1) - F.normalize(q[:1].flatten(1), dim=1)).pow(2).sum()
    assert cgc_loss(k[:1], q[:1], negatives=False).item() == pytest.approx(one.item(), rel=1e-6)  # batch 1 is fine


def test_perfect_consistency_scores_below_chance():
    torch.manual_seed(3)
    k = torch.rand(8, 7, 7) ** 4
    assert cgc_loss(k, k, tau=0.5).item() < math.log(8)


def test_an_all_zero_map_contributes_log_b():
    k = torch.zeros(4, 3, 3)
    assert cgc_loss(k, k).item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau")])
def test_rejects_bad_temperature(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cgc_loss(torch.rand(4, 2, 2), torch.rand(4, 2, 2), **kwargs)


def test_rejects_batch_of_one_with_negatives():
    with pytest.raises(ValueError, match="at least 2"):
        cgc_loss(torch.rand(1, 2, 2), torch.rand(1, 2, 2))
