"""`make demo`'s wall time, as a first-time user meets it (target <= 300 s on 2 cores).

    .venv/bin/python bench/demo_time.py [--k 10] [--quick]

Runs `tlray demo` in a fresh folder (a copy of jobs/, no data/, outputs/ or frozen-prefix cache) at the
demo's default size, and records the command's wall time with each job's own (from the demo's
results.json: the two sources, every target's modes and searches), so a miss says which jobs bound it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, save_results  # noqa: E402

TARGET_S = 300


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=None, help="labelled images per class (the demo's default)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick size")
    parser.add_argument("--json", default=str(BENCH / "results.json"), help="where the results go")
    args = parser.parse_args(argv)
    flags = [*(["--k", str(args.k)] if args.k else []), *(["--quick"] if args.quick else [])]
    with tempfile.TemporaryDirectory(prefix="tlray-demo-") as folder:
        cwd = Path(folder)
        shutil.copytree(BENCH.parent / "jobs", cwd / "jobs")
        env = {**ENV, "TLRAY_CACHE_DIR": str(cwd / "cache")}
        print(f"[bench] tlray demo {' '.join(flags)} in a fresh folder", flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-u", "-m", "tlray", "demo", *flags], cwd=cwd, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"tlray demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        report = json.loads((cwd / "outputs" / "demo" / "results.json").read_text())
    rows = report["rows"]
    result = {
        "wall_s": wall,
        "k": report["k"],
        "quick": report["quick"],
        "jobs": len(rows) + len({r["target"] for r in rows}),  # every row, and each target's source
        "demo_s": float(re.search(r"demo done in (\d+) s", done.stdout)[1]),  # its own count, after imports
        "rows_wall_s": sum(r["wall_seconds"] for r in rows),
        "rows_train_s": sum(r["train_seconds"] for r in rows),
        "sources_wall_s": [float(s) for s in re.findall(r"^\[tlray\] source .* in (\d+) s ->", done.stdout, re.M)],
        "searches_wall_s": [r["wall_seconds"] for r in rows if r["mode"] == "tune"],
        "target": f"<= {TARGET_S} s",
        "met": "yes" if wall <= TARGET_S else "**no**",
    }
    print(f"[bench]   {json.dumps(result)}", flush=True)
    save_results(args.json, "demo", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
