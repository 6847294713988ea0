"""What tlray prints for people, and where Ray's own output goes.

Workers and the driver print `[tlray] ...` lines (`say`). Ray forwards every line a worker, actor or
Ray Data task prints to the driver, where Ray's handler would print them all: training-result dicts,
execution plans, actor banners. `capture_ray_output` puts tlray's handler in its place: every line
goes to a log file, and only `[tlray]` lines reach the console. `-v` keeps Ray's handler as well, so
everything also shows live. The same filter runs in a `ray job submit` driver, so job logs read the same.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

MARK = "[tlray] "
LOG_FILE = "ray.log"
BAR_WIDTH = 20
# starting more worker processes than CPUs at once (a search's trials, each with a trainer) is expected here
ROUTINE_RAYLET_MESSAGES = ("PYTHON worker processes have been started",)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")  # Ray Data and Train give theirs own handlers


def say(message: str) -> None:
    # Ray Train routes print() through its logger, which echoes lines twice; the raw stream does not.
    print(f"{MARK}{message}", file=sys.__stdout__, flush=True)


class Laps:
    """Wall seconds of a run's parts, each part timed from the end of the one before: the run's timings, which
    metadata.json (`timings`), MLflow (metrics `seconds_<part>`) and the run's last console line record."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, part: str) -> dict[str, float]:
        """Time `part` as ending now; returns every part timed so far."""
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self.last
        self.last = now
        return dict(self.seconds)

    def note(self, part: str, seconds: float) -> None:
        """A part measured elsewhere, inside another part (the epochs' own time, inside the fit)."""
        self.seconds[part] = seconds

    def line(self) -> str:
        return "timings: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in self.seconds.items())


class Route:
    """The one routing state of this process: the log file, verbosity, whether worker lines are shown."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file: TextIO | None = None
        self.pending: list[str] = []  # lines before the log file is known (Ray starts before the run folder)
        self.verbose = False
        self.show_worker_lines = True
        self.installed = False
        self.pinned = False


route = Route()


def set_verbose(verbose: bool) -> None:
    route.verbose = verbose


def is_verbose() -> bool:
    return route.verbose


def quiet_ray_loggers() -> None:
    """After `import ray`, before `ray.init`: Ray's Python loggers on the driver write to the log file
    instead of the console, unless verbose."""
    import ray.data  # noqa: F401 — Ray Data sets up its loggers on import: replace them after that
    import ray.train  # noqa: F401

    if route.verbose:
        return
    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.addHandler(FileLines())
        ray_logger.propagate = False


def capture_ray_output() -> None:
    """After `ray.init`: forwarded worker output goes to the log file, `[tlray]` lines to the console."""
    from tlray.compat import ray as compat_ray  # imports Ray: it is running by now

    if route.installed:
        return
    dispatcher = compat_ray.worker_output_dispatcher()
    if not route.verbose:
        dispatcher.remove_handler(compat_ray.RAY_PRINT_HANDLER)
        compat_ray.print_raylet_messages_with(show_raylet_message)
    dispatcher.add_handler("tlray", show_forwarded_lines)
    route.installed = True


def log_path_for(run: str) -> Path:
    """`<run>/ray.log` for a local run folder; a local file named after the run for one in S3."""
    if "://" not in run:
        return Path(run, LOG_FILE)
    return Path(tempfile.gettempdir(), "tlray-logs", run.rstrip("/").rsplit("/", 1)[-1], LOG_FILE)


def log_to(path: str | Path, pin: bool = False) -> Path:
    """Write Ray's output to `path` from now on (and what came before it); returns the path in use.

    `pin`: keep this file for the rest of the process (`tlray demo`: one log for all its jobs)."""
    path = Path(path)
    with route.lock:
        if route.pinned and route.file is not None:
            return Path(route.file.name)
        route.pinned = pin
        if route.file is not None and Path(route.file.name) == path:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if route.file is not None:
            route.file.close()
        route.file = path.open("a", encoding="utf-8")
        route.file.writelines(route.pending)
        route.pending.clear()
        route.file.flush()
    return path


def show_worker_lines(show: bool) -> None:
    """`tlray demo` runs many jobs and prints one line per job: their epoch lines go to the log only."""
    route.show_worker_lines = show


def write_log(line: str) -> None:
    with route.lock:
        if route.file is None:
            route.pending.append(line)
        else:
            route.file.write(line)
            route.file.flush()


def progress_line(text: str, terminal: bool) -> str:
    """An epoch line `epoch 3/10 ...` with a bar in front on a terminal, as is otherwise."""
    epoch = re.search(r"\bepoch (\d+)/(\d+)", text)
    if not terminal or epoch is None:
        return text
    done, total = int(epoch[1]), int(epoch[2])
    filled = round(BAR_WIDTH * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


def show_forwarded_lines(data: dict) -> None:
    """Ray's dispatcher calls this with a batch of lines of one worker process."""
    prefix = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}) "
    for line in data.get("lines", []):
        write_log(prefix + line + "\n")
        if MARK in line and route.show_worker_lines and not route.verbose:
            text = line.split(MARK, 1)[1]
            print(MARK + progress_line(text, sys.stdout.isatty()), flush=True)


def show_raylet_message(data: dict, ignore_prefix: bool = False) -> None:
    """Messages the raylet pushes to the driver: to the log, and shown unless they are routine."""
    for line in data.get("lines", []):
        write_log(f"(raylet) {line}\n")
        if not any(routine in line for routine in ROUTINE_RAYLET_MESSAGES):
            print(f"(raylet) {line}", file=sys.stderr, flush=True)


class FileLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        write_log(f"({record.name}) {self.format(record)}\n")


SIGTERM_HANDLER: list = []  # the one tlray runs under (tlray.flows.exits: a SIGTERM stops the run as Ctrl-C does)


def handle_sigterm(handler) -> object:
    """Install `handler` for SIGTERM (None: put back what was there) and keep it installed across ray.init."""
    import signal

    if handler is None:
        SIGTERM_HANDLER.clear()
        return None
    SIGTERM_HANDLER[:] = [handler]
    return signal.signal(signal.SIGTERM, handler)


def reinstall_sigterm_handler() -> None:
    """ray.init installs its own SIGTERM handler (exit at once, killing a local cluster's processes); tlray's
    stops the run, then shuts Ray down itself."""
    import signal

    if SIGTERM_HANDLER and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, SIGTERM_HANDLER[0])


def start_ray(log_path: str | Path | None = None) -> None:
    """Join the cluster (RAY_ADDRESS, or inside a Ray job) or start a local one. Ray's own output goes to
    `log_path` (default: a file of this process under the temp folder), and with -v to the console too."""
    import ray

    path = log_to(log_path or Path(tempfile.gettempdir(), "tlray-logs", f"tlray-{os.getpid()}", LOG_FILE))
    if ray.is_initialized():
        return
    started = time.perf_counter()
    quiet_ray_loggers()
    ray.init()
    reinstall_sigterm_handler()
    capture_ray_output()
    resources = ray.cluster_resources()
    print(
        f"{MARK}Ray up in {time.perf_counter() - started:.1f} s: {resources.get('CPU', 0):g} CPU(s), "
        f"{resources.get('GPU', 0):g} GPU(s) in the cluster; Ray's output: {path}",
        flush=True,
    )
