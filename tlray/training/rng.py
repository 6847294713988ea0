"""A worker's random streams: seeded per rank, saved with every checkpoint, restored on resume.

Dropout (and anything else random in the loop) draws from the process's global generators. A resumed run
that merely re-seeded them would replay the first epochs' masks in its later epochs, and end elsewhere than
the undisturbed run. So each checkpoint holds every rank's torch (CPU, and CUDA when used), numpy and Python
states, as Lightning and the Hugging Face Trainer keep them, and a resumed rank continues its own stream.

A resume with another world size has ranks that saved no state: each derives one from (seed, epoch, rank),
so that restart is reproducible too, though not the stream an undisturbed run of that size would have drawn.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

RankStates = list[dict]  # one entry per rank, in rank order, as a checkpoint holds them


def seed_worker(seed: int, rank: int, device: torch.device) -> None:
    """Seed this rank's generators after the model is built (identically on every rank): each rank then draws
    its own dropout masks, as it would on its own GPU."""
    seed_all(np.random.SeedSequence([seed, rank]), device)


def derive(seed: int, epoch: int, rank: int, device: torch.device) -> None:
    """Deterministic streams for a rank that resumes at 0-based `epoch` with no saved state of its own."""
    seed_all(np.random.SeedSequence([seed, rank, epoch + 1]), device)


def seed_all(sequence: np.random.SeedSequence, device: torch.device) -> None:
    torch_seed, numpy_seed, python_seed = (int(word) for word in sequence.generate_state(3, np.uint64) >> 1)
    torch.manual_seed(torch_seed)  # the CPU's and every CUDA device's
    np.random.seed(numpy_seed % 2**32)
    random.seed(python_seed)


def capture(device: torch.device) -> dict:
    """This process's generator states (CUDA: the worker's own device only)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather(device: torch.device, world_size: int) -> RankStates:
    """Every rank's states, in rank order, on every rank (a collective: all ranks call it at the same point)."""
    mine = capture(device)
    if world_size == 1:
        return [mine]
    states: RankStates = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(states, mine)
    return states


def resume(saved: RankStates | None, seed: int, epoch: int, rank: int, device: torch.device) -> bool:
    """Continue this rank's saved streams before 0-based `epoch`; True when restored, False when derived
    (no state was saved for this rank: a checkpoint of a smaller group, or of an older tlray)."""
    if saved and rank < len(saved):
        restore(saved[rank], device)
        return True
    derive(seed, epoch, rank, device)
    return False
