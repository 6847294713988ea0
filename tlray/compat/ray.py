"""Ray's private names that tlray relies on, each checked against Ray 2.60 (pyproject pins ray 2.60.x)."""

from __future__ import annotations

# Ray Train V2 keeps its record of a run's checkpoints in this file in the run's storage folder; a run started
# again under the same name restores it (ray/train/v2/_internal/constants.py).
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as CHECKPOINT_MANAGER_SNAPSHOT

__all__ = ["CHECKPOINT_MANAGER_SNAPSHOT", "set_trial_status"]


def set_trial_status(tune_controller, trial, status: str) -> None:
    """Set a trial's status from a scheduler: Tune has no public call for it, but the controller it hands its
    schedulers lets this private one through (TuneController._wrapped). Checked against Ray 2.60
    (ray/tune/execution/tune_controller.py)."""
    tune_controller._set_trial_status(trial, status)
