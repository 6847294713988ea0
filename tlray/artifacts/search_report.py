"""A search's report: PNG plots and an index.html in `<run>/report/`, drawn from the run's stored results.

`tlray tune` writes `tune_results.json` and `confusion_matrix.json` into the run; everything here reads
only those, so `tlray report RUN_URI` redraws a report for any finished (or interrupted) search, local or
in S3. The report is not in the run's manifest: redrawing it never unseals the run.
"""

from __future__ import annotations

import html
from pathlib import Path

from tlray.artifacts.export import CONFUSION
from tlray.artifacts.manifest import is_sealed
from tlray.artifacts.pages import figure, file_name, link, page, read_if_stored, read_results, table, write_report
from tlray.artifacts.plots import plot_confusion, plot_learning_curves, plot_search_space, plot_trial_curve
from tlray.artifacts.run_report import confusion_title, gate_decision, gate_section

PLOTS = {
    "learning_curves.png": (
        "Validation metric per epoch, one line per trial (a line that ends early was stopped by ASHA)."
    ),
    "search_space.png": "Final metric of every trial over learning rate and freeze depth.",
    "confusion_matrix.png": "Confusion matrix of the published (best) model on the validation split.",
}


def write_search_report(run: str, endpoint_url: str | None = None) -> str:
    """Draw the plots and index.html into `<run>/report/`; returns the index.html location."""
    results = read_results(run, "tune_results.json", endpoint_url, "tune")
    confusion = read_if_stored(run, CONFUSION, endpoint_url)  # an interrupted search has published nothing yet
    published = is_sealed(run, endpoint_url)
    gate = gate_section(gate_decision(run, endpoint_url)) if published else "<p>Nothing published yet.</p>"
    return write_report(run, lambda folder: search_page(results, confusion, gate, folder), endpoint_url)


def search_page(results: dict, confusion: dict | None, gate: str, folder: Path) -> str:
    plot_learning_curves(results, folder / "learning_curves.png")
    plot_search_space(results, folder / "search_space.png")
    if confusion:
        plot_confusion(confusion, folder / "confusion_matrix.png", confusion_title(confusion))
    (folder / "trials").mkdir()
    for trial in results["trials"]:
        plot_trial_curve(trial, results["metric"], folder / "trials" / f"{file_name(trial['trial'])}.png")
    figures = "\n".join(figure(name, PLOTS[name]) for name in PLOTS if (folder / name).exists())
    return page("tlray search report", index_body(results, gate, figures))


def index_body(results: dict, gate: str, figures: str) -> str:
    metric, trials = results["metric"], results["trials"]
    rows = [
        [
            link(f"#trial-{file_name(t['trial'])}", t["trial"]),
            f"{t['lr']:.3g}",
            t["freeze_depth"],
            f"{t['epochs']}/{results['epochs']}",
            "-" if t["metric"] is None else t["metric"],
            "-" if t["best_metric"] is None else t["best_metric"],
            "error" if t["status"] == "error" else ("yes" if t["stopped_early"] else "no"),
        ]
        for t in trials
    ]
    best = trials[0] if trials else None
    summary = (
        f"Best trial <b>{html.escape(str(best['trial']))}</b>: lr {best['lr']:.3g}, "
        f"freeze depth {html.escape(str(best['freeze_depth']))}, "
        f"{html.escape(metric)} {best['metric']:.4f}."
        if best and best["metric"] is not None
        else "No trial finished."
    )
    header = ["trial", "lr", "freeze depth", "epochs", f"{metric} (last)", "best", "stopped early"]
    curves = "\n".join(
        figure(
            f"trials/{file_name(t['trial'])}.png",
            f"trial {t['trial']}: losses and {metric} per epoch",
            f"trial-{file_name(t['trial'])}",
        )
        for t in trials
    )
    return (
        f"<p>{summary} Trials are sorted by their last {html.escape(metric)} "
        f"({html.escape(results['mode'])} is better); each trial links to its learning curve.</p>\n"
        + table("trials", header, rows)
        + "\n<h2>Champion gate</h2>"
        + gate
        + "\n<h2>The search</h2>\n"
        + figures
        + "\n<h2>Each trial's learning curve</h2>\n"
        + curves
    )
