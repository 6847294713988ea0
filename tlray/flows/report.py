"""The search report: PNG plots and an index.html, rebuilt from a run's stored results.

`tlray tune` writes `tune_results.json` and `confusion_matrix.json` into the run;
everything here reads only those, so `tlray report RUN_URI` redraws a report for
any finished (or interrupted) search, local or in S3.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import numpy as np

from tlray.errors import UserError
from tlray.io import storage

PLOTS = {
    "learning_curves.png": (
        "Validation metric per epoch, one line per trial (a line that ends early was stopped by ASHA)."
    ),
    "search_space.png": "Final metric of every trial over learning rate and freeze depth.",
    "confusion_matrix.png": "Confusion matrix of the published (best) model on the validation split.",
}


def confusion_matrix_of(model, source, state: dict) -> dict:
    """The trained weights in `state`, loaded into `model` (the driver's), over the validation split (decoded
    by Ray Data, as in training)."""
    model.load_state_dict(state["model"])
    return {"classes": list(source.classes), "matrix": confusion_matrix(model, source)}


def confusion_matrix(model, source) -> list[list[int]]:
    """Counts[true][predicted] of `model` over the validation split of a tlray.data.pipeline.DataSource."""
    import torch

    from tlray.data.order import val_rows
    from tlray.data.pipeline import iter_batches

    num_classes = len(source.classes)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for batch in iter_batches(source, "val", val_rows(source.counts["val"], 0, 1), 64, torch.device("cpu")):
            good = batch["label"] >= 0  # undecodable images carry a negative label
            predicted = model(source.preprocessing.normalise(batch["image"][good])).argmax(1)
            np.add.at(counts, (batch["label"][good].numpy(), predicted.numpy()), 1)
    return counts.tolist()


def write_report(run: str, endpoint_url: str | None = None) -> str:
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(results: dict, path: Path) -> None:
    plt = _pyplot()
    metric, epochs = results["metric"], results["epochs"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for trial in results["trials"]:
        points = [(h["epoch"], h[metric]) for h in trial["history"] if h.get(metric) is not None]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        label = f"{trial['trial']}  lr={trial['lr']:.2g} depth={trial['freeze_depth']}"
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
        if trial["stopped_early"]:
            ax.plot(x[-1], y[-1], marker="X", markersize=10, color=line.get_color())
    ax.set(xlabel="epoch", ylabel=metric, xlim=(0.5, epochs + 0.5), title=f"{metric} per epoch (X = stopped early)")
    ax.set_xticks(range(1, epochs + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_search_space(results: dict, path: Path) -> None:
    plt = _pyplot()
    metric = results["metric"]
    trials = [t for t in results["trials"] if t["metric"] is not None]
    depths = sorted({str(t["freeze_depth"]) for t in trials}, key=lambda d: (d == "all", int(d) if d.isdigit() else 0))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if trials:
        points = ax.scatter(
            [t["lr"] for t in trials],
            [depths.index(str(t["freeze_depth"])) for t in trials],
            c=[t["metric"] for t in trials],
            s=120,
            cmap="viridis",
            edgecolors="black",
        )
        fig.colorbar(points, ax=ax, label=f"final {metric}")
    ax.set_xscale("log")
    ax.set_yticks(range(len(depths)), depths)
    ax.set(xlabel="learning rate", ylabel="freeze depth", title=f"final {metric} over the search space")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(confusion: dict, path: Path) -> None:
    plt = _pyplot()
    classes, counts = confusion["classes"], np.array(confusion["matrix"])
    size = max(4.5, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 6 else 0)
    ax.set_yticks(ticks, classes)
    for (i, j), value in np.ndenumerate(counts):
        if value:
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > counts.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=f"best trial {confusion.get('trial', '')} on the validation split")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


# ---------------------------------------------------------------------------------------
# `tlray demo`: accuracy per mode and depth, and the learning curves, one panel per target
# ---------------------------------------------------------------------------------------
def demo_label(row: dict) -> str:
    if row["mode"] == "partial":
        return "full fine-tune" if row["freeze_depth"] == 0 else f"partial {row['freeze_depth']}"
    return {"tune": f"tune: {row['freeze_depth']}, lr {row['lr']:.1g}"}.get(row["mode"], row["mode"])


def plot_demo(rows: list[dict], folder: Path) -> None:
    plt = _pyplot()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), dpi=100, squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        mine = [r for r in rows if r["target"] == target]
        colours = ["tab:grey" if r["mode"] == "random init" else "tab:blue" for r in mine]
        bars = ax.bar(range(len(mine)), [r["val_accuracy"] for r in mine], color=colours)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(mine)), [demo_label(r) for r in mine], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{target}: validation accuracy")
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), dpi=100, squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for r in (r for r in rows if r["target"] == target and r["mode"] != "tune"):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker=".", label=demo_label(r))
        ax.set(title=f"{target}: validation accuracy per epoch", xlabel="epoch", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png")
    plt.close(fig)
