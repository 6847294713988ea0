"""A trained run's report: `<run>/report/index.html`, drawn from the run's stored results only.

`tlray train` publishes metadata.json, metrics.json and confusion_matrix.json into the run, and the champion
gate appends its decision to the job's history.jsonl; this page reads those, so `tlray report RUN_URI` redraws
it for any published run, local or in S3.
"""

from __future__ import annotations

import html
from pathlib import Path

from tlray.artifacts import champion
from tlray.artifacts.export import CONFUSION, job_of
from tlray.artifacts.pages import figure, link, page, read_if_stored, read_results, table, write_report
from tlray.artifacts.plots import plot_confusion, plot_epoch_times, plot_run_curves
from tlray.metrics import per_class_scores

EPOCH_COLUMNS = (
    ("train_loss", "train loss"),
    ("train_accuracy", "train accuracy"),
    ("val_loss", "val loss"),
    ("val_accuracy", "val accuracy"),
)


def write_run_report(run: str, endpoint_url: str | None = None) -> str:
    """Draw the run's page into `<run>/report/`; returns the index.html location."""
    metadata = read_results(run, "metadata.json", endpoint_url, "train")
    history = read_results(run, "metrics.json", endpoint_url, "train")["history"]
    confusion = read_if_stored(run, CONFUSION, endpoint_url)  # an older tlray's checkpoints kept none
    decision = gate_decision(run, endpoint_url)
    return write_report(run, lambda folder: run_page(metadata, history, confusion, decision, folder), endpoint_url)


def gate_decision(run: str, endpoint_url: str | None) -> champion.Decision | None:
    """The champion gate's last decision on this run, from the job's history.jsonl."""
    mine = [line for line in champion.read_history(job_of(run), endpoint_url) if line.get("run") == run.rstrip("/")]
    return champion.Decision(**mine[-1]) if mine else None


def run_page(metadata: dict, history: list[dict], confusion: dict | None, decision, folder: Path) -> str:
    selection = metadata["selection"]
    plot_run_curves(history, selection["epoch"], folder / "curves.png")
    plot_epoch_times(history, folder / "epoch_times.png")
    sections = [
        summary(metadata),
        "<h2>Champion gate</h2>" + gate_section(decision),
        "<h2>Learning curves</h2>"
        + figure(
            "curves.png", f"Loss and accuracy per epoch; the dashed line is the published epoch: {selection['reason']}."
        )
        + epochs_table(history, selection["epoch"]),
        "<h2>Validation split</h2>" + validation_section(confusion, folder),
        "<h2>Freezing</h2>" + freeze_table(metadata),
        "<h2>Time</h2>"
        + figure("epoch_times.png", "Seconds per epoch; the feature pass (frozen blocks, computed once) apart.")
        + timings_table(metadata.get("timings", {})),
    ]
    return page(f"tlray run {metadata['run_id']}", "\n".join(sections))


def summary(metadata: dict) -> str:
    data, selection = metadata["dataset"], metadata["selection"]
    value = metadata["metrics"].get("val_accuracy")
    return (
        f"<p>{html.escape(metadata['arch'])} from <code>{html.escape(str(metadata['weights']))}</code>, "
        f"{html.escape(metadata['mode'])} mode, {len(metadata['classes'])} classes; "
        f"{data['train_images']:,} training and {data['val_images']:,} validation images "
        f"from <code>{html.escape(data['uri'])}</code>.</p>\n"
        f"<p>Published: epoch <b>{selection['epoch']}</b> of {metadata['epochs_run']} "
        f"({html.escape(selection['reason'])})"
        + (f", val accuracy <b>{value:.4f}</b>" if value is not None else "")
        + f". The model: {link('../model/model.pt2', 'model/model.pt2')} (torch.export), "
        f"{link('../model/state_dict.pt', 'model/state_dict.pt')}.</p>"
    )


def gate_section(decision: champion.Decision | None) -> str:
    if decision is None:
        return "<p>Not offered to the champion gate: the run was published and then stopped before it.</p>"
    return f'<p id="gate" class="{decision.action}">{html.escape(decision.line())}</p>'


def epochs_table(history: list[dict], selected_epoch: int) -> str:
    header = ["epoch", *(title for _, title in EPOCH_COLUMNS), "blocks frozen", "epoch s", "feature pass s"]
    rows = [
        [
            h["epoch"],
            *(h.get(key, "-") for key, _ in EPOCH_COLUMNS),
            h.get("freeze_depth", "-"),
            f"{h['epoch_seconds']:.2f}",
            f"{h['feature_pass_seconds']:.2f}" if "feature_pass_seconds" in h else "-",
        ]
        for h in history
    ]
    return table("epochs", header, rows, marked=[selected_epoch - 1])


def validation_section(confusion: dict | None, folder: Path) -> str:
    if confusion is None:
        return "<p>No confusion matrix: the run's checkpoints are from a tlray that kept none.</p>"
    plot_confusion(confusion, folder / "confusion_matrix.png", confusion_title(confusion))
    scores = per_class_scores(confusion["matrix"], confusion["classes"])
    rows = [[name, s["precision"], s["recall"], s["f1"], s["support"]] for name, s in scores.items()]
    return figure("confusion_matrix.png", "Confusion matrix of the published epoch: rows are the true class.") + table(
        "per-class", ["class", "precision", "recall", "F1", "support"], rows
    )


def confusion_title(confusion: dict) -> str:
    epoch = f"epoch {confusion['epoch']}" if "epoch" in confusion else "the published model"  # older runs: no epoch
    return f"{epoch} on the validation split"


def freeze_table(metadata: dict) -> str:
    frozen = metadata["frozen_blocks"]
    rows = [
        ["mode", metadata["mode"]],
        ["freeze depth", metadata["freeze_depth"]],
        ["frozen blocks", ", ".join(frozen) if frozen else "none"],
        ["trainable parameters", f"{metadata['trainable_parameters']:,}"],
        ["frozen parameters", f"{metadata['frozen_parameters']:,}"],
        ["precision", metadata.get("precision") or "fp32"],
    ]
    return table("freeze", ["", "value"], rows)


# a run's parts in the order they run (metadata.json keeps them sorted by name); the fit holds the epochs, and the
# epochs the feature pass
PARTS = {
    "index": "index the data",
    "weights": "weights and model",
    "cluster": "join or start Ray",
    "plan": "run plan",
    "fit": "fit: workers, epochs, checkpoints",
    "epochs": "… the epochs",
    "feature_pass": "… … the feature pass",
    "search": "search",
    "publish": "export and publish",
}


def timings_table(timings: dict[str, float]) -> str:
    order = list(PARTS)
    parts = sorted(timings, key=lambda part: order.index(part) if part in PARTS else len(order))
    rows = [[PARTS.get(part, part), f"{timings[part]:.2f}"] for part in parts]
    return table("timings", ["part of the run", "seconds"], rows)
