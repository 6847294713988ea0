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


def rank_shares(rows: int, seed: int, world_size: int, run_length: int = 1) -> list[np.ndarray]:
    """The training rows split into one fixed share per rank (sorted row numbers), for the whole run.

    A seeded random partition, never contiguous ranges (an index is sorted by class): each share is
    a uniform sample of the dataset. Fixed shares are what keeps the frozen-prefix cache at one
    forward pass per image across a cluster: a rank meets the same rows every epoch, so its node
    computes them once, where a global reshuffle would walk every node through almost every row.

    `run_length` > 1 (sharded layouts, whose consecutive rows are neighbours in one shard): the
    partition is of runs of that many consecutive rows, so a rank reads whole stretches of a shard;
    the runs, in a seeded order, are cut into world_size shares whose sizes differ by one row at most.
    """
    if run_length <= 1:
        order = np.random.default_rng([SHARES_STREAM, seed]).permutation(rows)
        return [np.sort(order[rank::world_size]) for rank in range(world_size)]
    runs = np.random.default_rng([SHARES_STREAM, seed]).permutation(-(-rows // run_length))
    starts = runs * run_length
    in_run_order = np.concatenate([np.arange(s, min(rows, s + run_length)) for s in starts] or [np.zeros(0, np.int64)])
    return [np.sort(part) for part in np.array_split(in_run_order.astype(np.int64), world_size)]


def run_order(share: np.ndarray, seed: int, epoch: int, rank: int, run_length: int) -> np.ndarray:
    """A share in a new order every epoch that keeps runs of `run_length` consecutive rows together (as
    WebDataset shuffles shards, not samples): the runs start at a seeded offset, so they differ from
    epoch to epoch, and are walked in a seeded order, each run's rows in ascending order."""
    rng = np.random.default_rng([seed, epoch, rank])
    start = int(rng.integers(run_length)) if len(share) > run_length else 0
    bounds = [0, *range(start or run_length, len(share), run_length), len(share)]
    runs = [share[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))] or [share[:0]])


def train_rows(rows: int, seed: int, epoch: int, rank: int, world_size: int, run_length: int = 1) -> np.ndarray:
    """This worker's rows for the epoch: its fixed share (`rank_shares`) in a new order every epoch.

    Every worker gets the same count, rows // world_size, so DDP steps stay in lock-step: a share one
    row larger than that leaves out one row an epoch, a different one each epoch (its order's last).
    `run_length` > 1: the order shuffles runs of consecutive rows (`run_order`) instead of single rows.
    """
    share = rank_shares(rows, seed, world_size, run_length)[rank]
    if run_length <= 1:
        return share[epoch_order(len(share), seed, epoch, rank)][: rows // world_size]
    return run_order(share, seed, epoch, rank, run_length)[: rows // world_size]


def train_batches(rows: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch) of every worker: whole batches only, at least one step."""
    batch = max(1, min(batch_size, rows // world_size))
    return batch, (rows // world_size) // batch


def val_rows(rows: int, rank: int, world_size: int) -> np.ndarray:
    """Fixed rows in a fixed order; across workers every validation image exactly once."""
    return np.arange(rank, rows, world_size)
