"""Which rows each worker reads, in which order: pure functions of (seed, epoch, rank, world size).

Nothing here touches data or Ray, so the driver, every worker and the tests compute the same rows.
"""

from __future__ import annotations

import numpy as np

SHARES_STREAM = 0x5A4E  # tags the random stream of the shares, apart from the epochs' streams


def epoch_order(rows: int, seed: int, epoch: int, rank: int = 0) -> np.ndarray:
    """A permutation of range(rows), new every epoch and the same on every re-run: the order in which
    rank `rank` walks its share that epoch (its own stream, so the ranks' orders are independent)."""
    return np.random.default_rng([seed, epoch, rank]).permutation(rows)


def rank_shares(rows: int, seed: int, world_size: int) -> list[np.ndarray]:
    """The training rows split into one fixed share per rank (sorted row numbers), for the whole run.

    A seeded random partition, never contiguous ranges (an index is sorted by class): each share is
    a uniform sample of the dataset. Fixed shares are what keeps the frozen-prefix cache at one
    forward pass per image across a cluster: a rank meets the same rows every epoch, so its node
    computes them once, where a global reshuffle would walk every node through almost every row.
    """
    order = np.random.default_rng([SHARES_STREAM, seed]).permutation(rows)
    return [np.sort(order[rank::world_size]) for rank in range(world_size)]


def train_rows(rows: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This worker's rows for the epoch: its fixed share (`rank_shares`) in a new order every epoch.

    Every worker gets the same count, rows // world_size, so DDP steps stay in lock-step: a share one
    row larger than that leaves out one row an epoch, a different one each epoch (its order's last).
    """
    share = rank_shares(rows, seed, world_size)[rank]
    return share[epoch_order(len(share), seed, epoch, rank)][: rows // world_size]


def train_batches(rows: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch) of every worker: whole batches only, at least one step."""
    batch = max(1, min(batch_size, rows // world_size))
    return batch, (rows // world_size) // batch


def val_rows(rows: int, rank: int, world_size: int) -> np.ndarray:
    """Fixed rows in a fixed order; across workers every validation image exactly once."""
    return np.arange(rank, rows, world_size)
