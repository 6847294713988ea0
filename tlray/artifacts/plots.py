"""The PNG plots of tlray's reports: a run's curves and epoch times, a search's learning curves and search space,
each trial's curve, a confusion matrix, and the demo's accuracy bars and curves. Drawn with matplotlib's file
backend: a cluster node has no display."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(results: dict, path: Path) -> None:
    plt = pyplot()
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
    plt = pyplot()
    metric = results["metric"]
    trials = [t for t in results["trials"] if t["metric"] is not None]
    # random init first (nothing pretrained), then the depths from 0 (nothing frozen) up to `all`
    depths = sorted(
        {str(t["freeze_depth"]) for t in trials},
        key=lambda d: (d != "random", d == "all", int(d) if d.isdigit() else 0),
    )
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


CONFUSION_NAMED = 60  # classes up to which the axes name every class
CONFUSION_COUNTED = 30  # ... and the cells show their counts
CONFUSION_INCHES = 16  # the largest side: 1,000 classes draw a heat map, not a 45,000 px image


def plot_confusion(confusion: dict, path: Path, title: str = "on the validation split") -> None:
    plt = pyplot()
    classes, counts = confusion["classes"], np.array(confusion["matrix"])
    size = min(max(4.5, 0.45 * len(classes) + 2), CONFUSION_INCHES)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(counts, cmap="Blues")
    if len(classes) <= CONFUSION_NAMED:
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 6 else 0)
        ax.set_yticks(ticks, classes)
    for (i, j), value in np.ndenumerate(counts if len(classes) <= CONFUSION_COUNTED else []):
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
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_run_curves(history: list[dict], selected_epoch: int, path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, side by side; the published epoch marked."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "o-"), ("val", "s-")):
            values = [h.get(f"{split}_{name}") for h in history]
            if any(v is not None for v in values):  # runs of older tlrays have no train_accuracy
                ax.plot(epochs, [float("nan") if v is None else v for v in values], style, markersize=4, label=split)
        ax.axvline(
            selected_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"published (epoch {selected_epoch})"
        )
        ax.set(xlabel="epoch", title=f"{name} per epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_epoch_times(history: list[dict], path: Path) -> None:
    """Seconds per epoch: the frozen-prefix cache's feature pass apart from training and validation."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    feature = [h.get("feature_pass_seconds", 0.0) for h in history]
    rest = [h["epoch_seconds"] - f for h, f in zip(history, feature, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(epochs, rest, color="tab:blue", label="training and validation")
    if any(feature):
        ax.bar(epochs, feature, bottom=rest, color="tab:orange", label="feature pass (frozen blocks, once)")
    ax.set(xlabel="epoch", ylabel="seconds", title="time per epoch")
    ax.set_xticks(epochs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_trial_curve(trial: dict, metric: str, path: Path) -> None:
    """One trial's losses and its search metric per epoch."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    epochs = [h["epoch"] for h in trial["history"]]
    for name, style in (("train_loss", "o-"), ("val_loss", "s-")):
        left.plot(epochs, [h.get(name, float("nan")) for h in trial["history"]], style, markersize=4, label=name)
    right.plot(epochs, [h.get(metric, float("nan")) for h in trial["history"]], "o-", markersize=4, color="tab:green")
    left.set(xlabel="epoch", title="loss")
    right.set(xlabel="epoch", title=metric)
    for ax in (left, right):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"trial {trial['trial']}: lr {trial['lr']:.3g}, freeze depth {trial['freeze_depth']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# `tlray demo`: accuracy per mode and depth, and the learning curves, one panel per target
# ---------------------------------------------------------------------------------------
def demo_label(row: dict) -> str:
    if row["mode"] == "partial":
        return "full fine-tune" if row["freeze_depth"] == 0 else f"partial {row['freeze_depth']}"
    return {"tune": f"tune: {row['freeze_depth']}, lr {row['lr']:.1g}"}.get(row["mode"], row["mode"])


def plot_demo(rows: list[dict], folder: Path) -> None:
    plt = pyplot()
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
