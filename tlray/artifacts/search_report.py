"""A search's report: PNG plots and an index.html in `<run>/report/`, drawn from the run's stored results.

`tlray tune` writes `tune_results.json` and `confusion_matrix.json` into the run; everything here reads
only those, so `tlray report RUN_URI` redraws a report for any finished (or interrupted) search, local or
in S3. The report is not in the run's manifest: redrawing it never unseals the run.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

from tlray.artifacts.plots import plot_confusion, plot_learning_curves, plot_search_space
from tlray.errors import UserError
from tlray.io import storage

PLOTS = {
    "learning_curves.png": (
        "Validation metric per epoch, one line per trial (a line that ends early was stopped by ASHA)."
    ),
    "search_space.png": "Final metric of every trial over learning rate and freeze depth.",
    "confusion_matrix.png": "Confusion matrix of the published (best) model on the validation split.",
}


def write_search_report(run: str, endpoint_url: str | None = None) -> str:
    """Draw the plots and index.html into `<run>/report/`; returns the index.html location."""
    try:
        results = storage.read_json(storage.join(run, "tune_results.json"), endpoint_url)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(
            f"RUN_URI: no tune_results.json in {run} ({exc}); give the folder `tlray tune` printed"
        ) from None
    try:
        confusion = storage.read_json(storage.join(run, "confusion_matrix.json"), endpoint_url)
    except (FileNotFoundError, OSError):
        confusion = None  # an interrupted search has results but no published model yet

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plot_learning_curves(results, out / "learning_curves.png")
        plot_search_space(results, out / "search_space.png")
        if confusion:
            plot_confusion(confusion, out / "confusion_matrix.png")
        (out / "index.html").write_text(index_html(results, confusion, sorted(p.name for p in out.glob("*.png"))))
        storage.upload_dir(out, storage.join(run, "report"), endpoint_url)
    return storage.join(run, "report", "index.html")


def index_html(results: dict, confusion: dict | None, images: list[str]) -> str:
    metric = html.escape(results["metric"])
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                t["trial"],
                f"{t['lr']:.3g}",
                t["freeze_depth"],
                f"{t['epochs']}/{results['epochs']}",
                "-" if t["metric"] is None else f"{t['metric']:.4f}",
                "-" if t["best_metric"] is None else f"{t['best_metric']:.4f}",
                "error" if t["status"] == "error" else ("yes" if t["stopped_early"] else "no"),
            )
        )
        + "</tr>"
        for t in results["trials"]
    )
    figures = "\n".join(
        f'<figure><img src="{name}" alt="{html.escape(PLOTS.get(name, name))}">'
        f"<figcaption>{html.escape(PLOTS.get(name, name))}</figcaption></figure>"
        for name in images
    )
    best = results["trials"][0] if results["trials"] else None
    summary = (
        f"Best trial <b>{html.escape(str(best['trial']))}</b>: lr {best['lr']:.3g}, "
        f"freeze depth {html.escape(str(best['freeze_depth']))}, "
        f"{metric} {best['metric']:.4f}."
        if best and best["metric"] is not None
        else "No trial finished."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tlray search report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}figure{{margin:1.5em 0}}img{{max-width:100%}}</style>
</head><body>
<h1>tlray search report</h1>
<p>{summary} Trials are sorted by their last {metric} ({html.escape(results["mode"])} is better).</p>
<table><thead><tr><th>trial</th><th>lr</th><th>freeze depth</th><th>epochs</th><th>{metric} (last)</th>
<th>best</th><th>stopped early</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{figures}
</body></html>
"""
