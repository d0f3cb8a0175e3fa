"""Which samples each rank reads at each step, for every map-style loader (classification, segmentation,
detection): a seeded permutation per epoch, every global step taking the next batch_size x world_size positions
(rank r its block r), so the data order is a pure function of (seed, epoch, step) and a run resumes exactly
from any step; evaluation splits the samples into one contiguous block per rank, each read once."""

from __future__ import annotations

import numpy as np

from .sources import DataError


def epoch_order(subset: np.ndarray, num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Source indices for one epoch: seeded permutations of the subset, repeated when epoch_samples > its size."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    reps = -(-num_samples // len(subset))
    return np.concatenate([subset[rng.permutation(len(subset))] for _ in range(reps)])[:num_samples]


def full_steps(num_samples: int, per_step: int, what: str) -> int:
    """Steps of an epoch: full batches of `per_step` (batch_size x world_size) samples; none is an error."""
    steps = num_samples // per_step
    if steps < 1:
        raise DataError(
            f"{what}: {num_samples} samples make no full batch of {per_step} (batch_size x world_size)"
        )
    return steps


def train_bounds(
    batch_size: int, rank: int, world_size: int, start_step: int, steps: int
) -> list[tuple[int, int]]:
    """[start, end) positions in the epoch's order of rank `rank`'s batch at each step start_step .. steps - 1."""
    return [
        ((k * world_size + rank) * batch_size, (k * world_size + rank + 1) * batch_size)
        for k in range(start_step, steps)
    ]


def eval_bounds(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Batches of rank `rank`'s contiguous block of the samples (no padding: nothing is counted twice)."""
    lo, hi = num_samples * rank // world_size, num_samples * (rank + 1) // world_size
    return [(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]
