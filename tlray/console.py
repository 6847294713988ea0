"""What tlray prints for people: one `[tlray] ...` line per event, from the driver or any worker."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    # Ray Train routes print() through its logger, which echoes lines twice; the raw stream does not.
    print(f"[tlray] {message}", file=sys.__stdout__, flush=True)
