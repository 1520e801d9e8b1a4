"""Training samplers that a run can resume mid-epoch: same order, the batches already trained skipped unread.

An epoch's order is drawn from the loader's generator (``RandomSampler``) or
from its seed and epoch (``DistributedSampler``). ``engine.fit`` keeps the
generator's state at the epoch's start in a mid-epoch checkpoint; on resume it
restores that state and asks :func:`skip_batches` to leave out the batches
trained before the checkpoint. The wrapped sampler still draws its whole
order (the generator ends where an uninterrupted pass leaves it) and the
skipped images are never loaded, so a resume costs no data loading.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """The indices of ``sampler``, less the first ``n`` of the next pass after :meth:`skip` (n)."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self._skip = 0

    def __len__(self) -> int:
        return len(self.sampler)  # the whole pass: a schedule's length does not depend on where a run resumed

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to a ``DistributedSampler``, whose order is a function of its seed and the epoch."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self, n: int) -> None:
        """Leave out the first ``n`` indices of the next pass only."""
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        n, self._skip = self._skip, 0
        it = iter(self.sampler)
        next(itertools.islice(it, n, n), None)  # consume n indices: drawn, never fetched
        yield from it


def skip_batches(loader: Iterable, n: int) -> None:
    """Make the next pass over ``loader`` (a DataLoader over a :class:`ResumableSampler`) start at batch ``n``.

    The batches that follow are those of an uninterrupted pass: ``n`` whole batches of indices are left out.
    """
    if n == 0:
        return
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        raise ValueError(f"resuming mid-epoch at batch {n} needs a DataLoader whose sampler is a ResumableSampler "
                         f"(train.trial builds them), got sampler {type(sampler).__name__}; set "
                         "failure.checkpoint_every_steps=null to checkpoint at epoch ends only")
    sampler.skip(n * loader.batch_size)
