"""Ray's private names that tlray relies on, each checked against Ray 2.60 (pyproject pins ray 2.60.x)."""

from __future__ import annotations

# Ray Train V2 keeps its record of a run's checkpoints in this file in the run's storage folder; a run started
# again under the same name restores it (ray/train/v2/_internal/constants.py).
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as CHECKPOINT_MANAGER_SNAPSHOT

__all__ = ["CHECKPOINT_MANAGER_SNAPSHOT"]
