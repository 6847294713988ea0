"""The Ray head's preStop hook: SIGTERM to the tlray driver, then wait for it to exit.

KubeRay starts the head as `bash -c "... ray start --head --block"`. bash as PID 1 ignores SIGTERM, so when
a pod is preempted, evicted or deleted, the driver of a `tlray train`/`tune` job never hears of it and dies
in the SIGKILL at the end of the grace period. The kubelet runs this hook first (`python -m tlray.prestop`):
it finds the drivers by their command line in /proc, sends each SIGTERM (tlray then stops the run as Ctrl-C
does, exit 143, every sealed checkpoint kept) and returns once they have exited, or after `--wait` seconds.

Standard library only, and /proc only (no procps in the image needed): it runs in the head container.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

RUN_COMMANDS = ("train", "tune")  # the tlray commands that run a job on the cluster
POLL_SECONDS = 0.2


def is_tlray_run(argv: list[str]) -> bool:
    """`tlray train|tune ...` as a console script (`python .../bin/tlray train`) or `python -m tlray train`.

    The shell that Ray's job supervisor starts (`sh -c "tlray train job.yaml"`) holds the command as one
    word, so it is not matched: it stays to report the driver's exit code to Ray."""
    for i, word in enumerate(argv[:-1]):
        named = os.path.basename(word) == "tlray" or (word == "-m" and argv[i + 1] == "tlray")
        rest = argv[i + 2 :] if word == "-m" else argv[i + 1 :]
        if named and rest and rest[0] in RUN_COMMANDS:
            return True
    return False


def command_line(pid_dir: Path) -> list[str]:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return []
    return [word.decode(errors="replace") for word in raw.split(b"\0") if word]


def driver_pids(proc: Path = Path("/proc")) -> list[int]:
    own = os.getpid()
    return sorted(
        int(entry.name)
        for entry in proc.iterdir()
        if entry.name.isdigit() and int(entry.name) != own and is_tlray_run(command_line(entry))
    )


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited driver stays a zombie until its shell reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_drivers(wait_seconds: float, proc: Path = Path("/proc")) -> tuple[list[int], list[int]]:
    """SIGTERM every tlray driver; (signalled, still running after `wait_seconds`)."""
    signalled = []
    for pid in driver_pids(proc):
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait_seconds
    left = [pid for pid in signalled if running(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        left = [pid for pid in left if running(pid)]
    return signalled, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlray.prestop", description=__doc__.split("\n")[0])
    parser.add_argument("--wait", type=float, default=90, help="longest wait for the drivers to exit (seconds)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    signalled, left = stop_drivers(args.wait)
    took = time.monotonic() - started
    if not signalled:
        print("[tlray] preStop: no tlray driver running", flush=True)
    elif left:
        print(f"[tlray] preStop: driver(s) {left} still running after {took:.1f} s", flush=True)
    else:
        print(f"[tlray] preStop: driver(s) {signalled} stopped in {took:.1f} s", flush=True)
    return 0  # a failing hook changes nothing for the kubelet but an event: the pod goes either way


if __name__ == "__main__":
    sys.exit(main())
