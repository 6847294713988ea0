"""The demo's report: `outputs/demo/report/index.html`, drawn from the demo's results.json only.

The mode table (the console's, as HTML, each row linking to its run's own report), the accuracy bars and the
learning curves, and the reading of this run's numbers that the README gives over three seeds: where transfer
pays against random init, what freezing saves, and whether the search found the best hand-picked row.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from tlray.artifacts.pages import REPORT, figure, link, page, read_results, table, write_report
from tlray.artifacts.plots import demo_label, plot_demo

RESULTS = "results.json"
HEADER = ("target", "mode", "freeze depth", "trainable params", "val accuracy", "train s", "wall s")
MATCH_POINTS = 0.5  # a search within this many points of the best hand-picked row matches it


def mode_name(row: dict) -> str:
    if row["mode"] != "tune":
        return row["mode"]
    return f"tune (lr {row['lr']:.2g}{', random init' if row.get('random_init') else ''})"


def columns(row: dict) -> list[str]:
    """One row of the mode table, as the console, table.md and the page show it."""
    return [
        row["target"],
        mode_name(row),
        str(row["freeze_depth"]),
        f"{row['trainable']:,}",
        f"{row['val_accuracy']:.3f}",
        f"{row['train_seconds']:.1f}",
        f"{row['wall_seconds']:.0f}",
    ]


def write_demo_page(out: str, endpoint_url: str | None = None) -> str:
    """Draw the demo's page into `<out>/report/` from `<out>/results.json`; returns the index.html location."""
    results = read_results(out, RESULTS, endpoint_url, "demo")
    return write_report(out, lambda folder: demo_page(results, out, folder), endpoint_url)


def demo_page(results: dict, out: str, folder: Path) -> str:
    rows = results["rows"]
    plot_demo(rows, folder)
    reading = "\n".join(f"<li>{html.escape(line)}</li>" for line in reading_lines(rows))
    body = (
        f"<p>{results['k']} labelled images per class in each target, seed {results['seed']}"
        f"{' (quick size)' if results.get('quick') else ''}. <i>train s</i> is the epochs' own time (feature pass,"
        " training, validation); <i>wall s</i> the whole job. Each row's mode links to its run's report.</p>\n"
        + table("modes", HEADER, [linked(columns(r), r["run"], out) for r in rows])
        + f"\n<h2>What this run shows</h2>\n<ul>{reading}</ul>\n"
        + figure("accuracy.png", "Validation accuracy per mode and freeze depth, one panel per target.")
        + figure("learning_curves.png", "Validation accuracy per epoch of every row but the searches.")
    )
    return page("tlray demo: when does transfer pay?", body)


def linked(cells: list[str], run: str, out: str) -> list:
    """The mode cell as a relative link to the run's report, where both are local folders (not with --s3)."""
    if "://" in run or "://" in out:
        return cells
    href = os.path.relpath(Path(run) / REPORT / "index.html", Path(out) / REPORT)
    return [cells[0], link(Path(href).as_posix(), cells[1]), *cells[2:]]


def reading_lines(rows: list[dict]) -> list[str]:
    """The README's reading, on this run's numbers: one line per finding and target."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        random = next((r for r in mine if r["mode"] == "random init"), None)
        full = next((r for r in mine if r["mode"] == "partial" and r["freeze_depth"] == 0), None)
        frozen = [r for r in mine if r["mode"] == "feature extractor" or (r["mode"] == "partial" and r["freeze_depth"])]
        extractor = next((r for r in mine if r["mode"] == "feature extractor"), None)
        if random and frozen:
            best = max(frozen, key=lambda r: r["val_accuracy"])
            line = f"{target}: the best frozen row ({demo_label(best)}, {best['val_accuracy']:.3f}) is " + versus(
                best, random, "random init"
            )
            if full:
                line += f"; full fine-tuning ({full['val_accuracy']:.3f}) is " + versus(full, random, "random init")
            lines.append(line + ".")
        if full and extractor and extractor["train_seconds"] > 0:
            full_s, extractor_s = full["train_seconds"], extractor["train_seconds"]
            lines.append(
                f"{target}: the feature extractor's epochs took {full_s / extractor_s:.1f}x less time than full "
                f"fine-tuning's ({extractor_s:.1f} s against {full_s:.1f} s)."
            )
        search = next((r for r in mine if r["mode"] == "tune"), None)
        picked = [r for r in mine if r["mode"] != "tune"]
        if search and picked:
            best = max(picked, key=lambda r: r["val_accuracy"])
            gap = 100 * (search["val_accuracy"] - best["val_accuracy"])
            verdict = "matches" if abs(gap) <= MATCH_POINTS else ("beats" if gap > 0 else "falls short of")
            lines.append(
                f"{target}: the search ({search['val_accuracy']:.3f}) {verdict} the best hand-picked row "
                f"({demo_label(best)}, {best['val_accuracy']:.3f}): {gap:+.1f} points."
            )
    return lines


def versus(row: dict, baseline: dict, name: str) -> str:
    points = 100 * (row["val_accuracy"] - baseline["val_accuracy"])
    return f"{abs(points):.1f} points {'above' if points >= 0 else 'below'} {name} ({baseline['val_accuracy']:.3f})"
