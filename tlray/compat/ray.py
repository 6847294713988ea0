"""Ray's private names that tlray relies on, each checked against Ray 2.60 (pyproject pins ray 2.60.x)."""

from __future__ import annotations

# Ray Train V2 keeps its record of a run's checkpoints in this file in the run's storage folder; a run started
# again under the same name restores it (ray/train/v2/_internal/constants.py).
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as CHECKPOINT_MANAGER_SNAPSHOT

__all__ = ["CHECKPOINT_MANAGER_SNAPSHOT", "set_trial_status"]


# ---------------------------------------------------------------------------------------
# tlray.console: where the driver's copy of worker output goes (checked against Ray 2.60)
# ---------------------------------------------------------------------------------------
# The name ray._private.worker.connect gives the handler that prints forwarded worker lines on the driver.
RAY_PRINT_HANDLER = "ray_print_logs"


def worker_output_dispatcher():
    """ray._private.ray_logging.global_worker_stdstream_dispatcher: it hands every batch of lines a worker,
    actor or Ray Data task printed to each handler registered on it (add_handler / remove_handler)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def print_raylet_messages_with(printer) -> None:
    """The raylet's messages to the driver (worker crashes, memory kills) bypass the dispatcher: Ray prints
    them with ray._private.worker.print_to_stdstream(data, ignore_prefix), which `printer` replaces."""
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = printer


def set_trial_status(tune_controller, trial, status: str) -> None:
    """Set a trial's status from a scheduler: Tune has no public call for it, but the controller it hands its
    schedulers lets this private one through (TuneController._wrapped). Checked against Ray 2.60
    (ray/tune/execution/tune_controller.py)."""
    tune_controller._set_trial_status(trial, status)
