"""How a command ends: its exit code, its last line, and Ray stopped before that line.

Exit codes: 0 success, 2 bad input (spec, data, paths: one clear message, no traceback), 3 an image that
could not be read after retries (the run stopped, nothing published; running it again resumes), 1 internal
error; Ctrl-C and SIGTERM as a shell reports them (130, 143): every complete checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from tlray import console
from tlray.errors import ReadFailure, error_inside, user_error_inside

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_IO_FAILURE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 2, 128 + 15  # as a shell reports SIGINT and SIGTERM
TERMINATED: list[int] = []  # the SIGTERM received, if any


def exit_code_of(command: Callable[[], object]) -> int:
    """Run `command` (a whole tlray command) and say whose fault it was if it failed: the exit code."""
    try:
        with sigterm_stops_the_run():
            command()
            return EXIT_OK
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and not TERMINATED:  # SystemExit: Ray Train's SIGINT handler may end so
            raise
        stop_ray()
        if TERMINATED:
            print(
                "tlray: terminated (SIGTERM); every complete checkpoint is kept: run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_TERMINATED
        print("tlray: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — the last line of defence: say whose fault it is
        user_error = user_error_inside(exc)  # also finds one raised on a Ray worker
        read_failure = error_inside(exc, ReadFailure)  # or in a Ray Data task under a worker
        if user_error is None and read_failure is None:
            traceback.print_exc()
        stop_ray()  # so Ray's forwarded worker logs end before tlray's last word
        if user_error is not None:
            print(f"tlray: error: {user_error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if read_failure is not None:
            print(
                f"tlray: error: {str(read_failure).splitlines()[0]}. The run stopped and published nothing; "
                "once the store is reachable, run the same command again to resume from the last checkpoint",
                file=sys.stderr,
            )
            return EXIT_IO_FAILURE
        print(f"tlray: internal error ({type(exc).__name__}); please report it with the output above", file=sys.stderr)
        return EXIT_INTERNAL


@contextlib.contextmanager
def sigterm_stops_the_run():
    """SIGTERM (Kubernetes' preemption and eviction, `kill`) stops a run as Ctrl-C does, instead of killing the
    process mid-call: Ray Train's SIGINT handler, while a run is on, aborts its workers. Checkpoints are sealed
    (tlray.io.checkpoints), so the next run resumes from the newest complete one, whenever the signal came."""
    TERMINATED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def on_sigterm(signum, frame):
        TERMINATED.append(signum)
        on_sigint = signal.getsignal(signal.SIGINT)
        if getattr(on_sigint, "graceful", False):
            on_sigint(signal.SIGINT, frame)  # tlray.training.search's: the search saves its state and returns
            return
        if callable(on_sigint) and on_sigint is not signal.default_int_handler:
            on_sigint(signal.SIGINT, frame)  # Ray Train's: abort the run's controller and workers
        raise KeyboardInterrupt

    previous = console.handle_sigterm(on_sigterm)
    try:
        yield
    finally:
        console.handle_sigterm(None)
        signal.signal(signal.SIGTERM, previous)


def stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
