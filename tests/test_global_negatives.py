"""Global negatives across torch.distributed ranks (gloo, two processes on loopback)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cgc_ray.method.loss import cgc_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, k: torch.Tensor, q: torch.Tensor, anchor: str, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = k.shape[0] // world
        k_local = k[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        q_local = q[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        loss = cgc_loss(k_local, q_local, tau=0.5, anchor=anchor, global_negatives=True)
        # DDP averages gradients over ranks: the global objective is the mean of the rank losses
        (loss / world).backward()
        grads = [torch.zeros_like(k_local.grad) for _ in range(world)]
        dist.all_gather(grads, k_local.grad)
        if rank == 0:
            losses = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(losses, loss.detach())
            out["loss"] = torch.stack(losses).mean()
            out["k_grad"] = torch.cat(grads)
        else:
            dist.all_gather([torch.zeros(()) for _ in range(world)], loss.detach())
    finally:
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT otherwise)
        dist.destroy_process_group()


@pytest.mark.parametrize("anchor", ["paper", "authors"])
def test_global_negatives_equal_one_big_batch(anchor):
    torch.manual_seed(0)
    k, q = torch.rand(8, 5, 5), torch.rand(8, 5, 5)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), k, q, anchor, out), nprocs=2, join=True)
    k_all = k.clone().requires_grad_(True)
    ref = cgc_loss(k_all, q, tau=0.5, anchor=anchor)  # all 8 keys are every query's candidates
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    # gradients reach keys on the other rank: the sum over ranks equals the single-batch gradient
    torch.testing.assert_close(out["k_grad"], k_all.grad, rtol=1e-4, atol=1e-6)
