"""The report pages of a run, a search and the demo, drawn from stored results only (no Ray): their tables' values,
links and images, `tlray report`'s choice of page, and each kind rendered in headless Chromium."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tlray.artifacts.demo_report import reading_lines
from tlray.artifacts.plots import plot_confusion
from tlray.cli import main
from tlray.flows.report import draw_report

from browser import check_renders

CLASSES = ["cat", "dog", "fox"]
# counts[true][predicted] of the published epoch (2): cat 8 of 10 right, dog 9 of 10, fox 5 of 6
MATRIX = [[8, 1, 1], [1, 9, 0], [0, 1, 5]]


class Page(HTMLParser):
    """What a page holds: each table's body rows (cell texts), the marked rows, links, images and element ids."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.marked: dict[str, list[int]] = {}
        self.links, self.images, self.ids, self.stylesheets = [], [], set(), []
        self._table = self._row = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self._table = attrs["id"]
            self.tables[self._table], self.marked[self._table] = [], []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
            if attrs.get("class") == "marked":
                self.marked[self._table].append(len(self.tables[self._table]))
        elif tag == "td" and self._row is not None:
            self._row.append("")
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "link":
            self.stylesheets.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._row is not None and self._row:
            self._row[-1] += data


def epoch(n: int, train_loss: float, val_accuracy: float, feature_pass: float | None = None) -> dict:
    metrics = {
        "epoch": n,
        "train_loss": train_loss,
        "train_accuracy": 0.5 + 0.1 * n,
        "val_loss": train_loss + 0.1,
        "val_accuracy": val_accuracy,
        "epoch_seconds": 2.0,
        "freeze_depth": 2,
    }
    return metrics | ({"feature_pass_seconds": feature_pass} if feature_pass is not None else {})


def write_run(job: Path, run_id: str = "train-abc") -> Path:
    """A published run as `tlray train` stores it, and the champion gate's decision on it."""
    run = job / "runs" / run_id
    (run / "model").mkdir(parents=True)
    for name in ("model.pt2", "state_dict.pt"):
        (run / "model" / name).write_bytes(b"weights")  # what the page links to
    history = [epoch(1, 1.2, 0.60, 1.5), epoch(2, 0.8, 22 / 26), epoch(3, 0.7, 0.80)]
    (run / "metrics.json").write_text(json.dumps({"history": history, "selected": history[1], "final": history[2]}))
    metadata = {
        "run_id": run_id,
        "arch": "resnet18",
        "weights": "DEFAULT",
        "mode": "partial",
        "classes": CLASSES,
        "freeze_depth": 2,
        "frozen_blocks": ["stem", "layer1"],
        "trainable_parameters": 11_024_138,
        "frozen_parameters": 157_504,
        "precision": None,
        "metrics": history[1],
        "selection": {"epoch": 2, "metric": "val_accuracy", "mode": "max", "value": 22 / 26, "reason": "best"},
        "epochs_run": 3,
        "dataset": {"uri": "s3://b/pets", "train_images": 120, "val_images": 26},
        "timings": {"fit": 7.5, "index": 0.5, "publish": 0.9},
    }
    (run / "metadata.json").write_text(json.dumps(metadata))
    (run / "confusion_matrix.json").write_text(json.dumps({"classes": CLASSES, "matrix": MATRIX, "epoch": 2}))
    decision = {
        "action": "promoted",
        "reason": "first champion",
        "run": str(run),
        "value": 22 / 26,
        "champion": None,
        "champion_value": None,
        "metric": "val_accuracy",
        "policy": "gate",
        "at": "2026-12-06T00:00:00Z",
    }
    other = {**decision, "run": str(job / "runs" / "train-older"), "action": "kept"}
    (job / "history.jsonl").write_text(json.dumps(other) + "\n" + json.dumps(decision) + "\n")
    return run


TRIALS = [
    {
        "trial": "a_00000",
        "lr": 0.01,
        "freeze_depth": 2,
        "epochs": 3,
        "metric": 0.9,
        "best_metric": 0.9,
        "stopped_early": False,
        "status": "done",
        "history": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.3 * e} for e in (1, 2, 3)],
    },
    {
        "trial": "a_00001",
        "lr": 0.1,
        "freeze_depth": "all",
        "epochs": 1,
        "metric": 0.2,
        "best_metric": 0.2,
        "stopped_early": True,
        "status": "done",
        "history": [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_accuracy": 0.2}],
    },
]


def write_search(folder: Path) -> Path:
    folder.mkdir(parents=True)
    results = {"metric": "val_accuracy", "mode": "max", "epochs": 3, "trials": TRIALS}
    (folder / "tune_results.json").write_text(json.dumps(results))
    (folder / "confusion_matrix.json").write_text(json.dumps({"classes": ["x", "y"], "matrix": [[3, 1], [0, 4]]}))
    return folder


def demo_row(target: str, mode: str, depth: int, accuracy: float, seconds: float, run: str, lr: float = 0.01) -> dict:
    return {
        "target": target,
        "mode": mode,
        "freeze_depth": depth,
        "trainable": 1000 - 100 * depth,
        "val_accuracy": accuracy,
        "train_seconds": seconds,
        "wall_seconds": seconds + 10,
        "run": run,
        "lr": lr,
        "curve": [accuracy / 2, accuracy],
        "random_init": False,
    }


def write_demo(out: Path, runs: Path) -> Path:
    out.mkdir(parents=True)
    rows = [
        demo_row("new domain", "random init", 0, 0.600, 16.0, str(runs / "r0")),
        demo_row("new domain", "partial", 0, 0.850, 16.0, str(runs / "r1")),
        demo_row("new domain", "partial", 2, 0.870, 8.0, str(runs / "r2")),
        demo_row("new domain", "feature extractor", 5, 0.700, 2.5, str(runs / "r3")),
        demo_row("new domain", "tune", 2, 0.866, 40.0, str(runs / "r4"), lr=0.00056),
    ]
    (out / "results.json").write_text(json.dumps({"k": 10, "seed": 0, "quick": False, "rows": rows}))
    for row in rows:  # each row's run page, which the demo's table links to
        (Path(row["run"]) / "report").mkdir(parents=True)
        (Path(row["run"]) / "report" / "index.html").write_text("<p>run</p>")
    return out


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_a_run_page_shows_every_epoch_the_published_one_marked_and_the_validation_scores(tmp_path):
    run = write_run(tmp_path / "job")
    index = Path(draw_report(str(run)))
    assert index == run / "report" / "index.html"
    page = Page(index.read_text())
    epochs = page.tables["epochs"]
    assert [row[0] for row in epochs] == ["1", "2", "3"]
    assert page.marked["epochs"] == [1]  # epoch 2, the selected one
    assert epochs[1][1:5] == ["0.8000", "0.7000", "0.9000", f"{22 / 26:.4f}"]  # train/val loss and accuracy
    assert [row[-1] for row in epochs] == ["1.50", "-", "-"]  # the feature pass, in epoch 1 only
    per_class = {row[0]: row[1:] for row in page.tables["per-class"]}
    # cat: 8 of the 9 predicted cat are cats (precision), 8 of the 10 cats found (recall)
    assert per_class["cat"] == ["0.8889", "0.8000", f"{2 * (8 / 9) * 0.8 / (8 / 9 + 0.8):.4f}", "10"]
    assert per_class["fox"] == ["0.8333", "0.8333", "0.8333", "6"]
    freeze = dict((row[0], row[1]) for row in page.tables["freeze"])
    assert freeze["frozen blocks"] == "stem, layer1"
    assert freeze["trainable parameters"] == "11,024,138"
    # in the order the parts ran, not metadata.json's (by name)
    assert [row[0] for row in page.tables["timings"]] == [
        "index the data",
        "fit: workers, epochs, checkpoints",
        "export and publish",
    ]
    gate = index.read_text().split('<p id="gate" class="promoted">', 1)[1].split("</p>", 1)[0]
    assert "promoted train-abc" in gate  # this run's decision, not the older run's in the same history
    assert "first champion" in gate
    # every image the page names is a real PNG beside it, and every link stays inside the run's folder
    assert sorted(page.images) == ["confusion_matrix.png", "curves.png", "epoch_times.png"]
    for name in page.images:
        assert png_size(index.parent / name)[0] >= 400
    assert page.stylesheets == ["style.css"]
    assert (index.parent / "style.css").stat().st_size > 100
    assert page.links == ["../model/model.pt2", "../model/state_dict.pt"]


def test_a_run_page_without_a_gate_decision_or_confusion_matrix_says_so(tmp_path):
    run = write_run(tmp_path / "job")
    (run / "confusion_matrix.json").unlink()
    (tmp_path / "job" / "history.jsonl").unlink()
    text = Path(draw_report(str(run))).read_text()
    assert "Not offered to the champion gate" in text
    assert "No confusion matrix" in text
    assert "per-class" not in Page(text).tables


def test_a_search_page_links_every_trial_to_its_learning_curve(tmp_path):
    run = write_search(tmp_path / "search")
    assert main(["report", str(run)]) == 0
    index = run / "report" / "index.html"
    page = Page(index.read_text())
    assert [row[0] for row in page.tables["trials"]] == ["a_00000", "a_00001"]
    assert [row[-1] for row in page.tables["trials"]] == ["no", "yes"]  # stopped early
    assert "<h2>Champion gate</h2><p>Nothing published yet.</p>" in index.read_text()  # no MANIFEST.json: unsealed
    assert page.links == ["#trial-a_00000", "#trial-a_00001"]
    assert {"trial-a_00000", "trial-a_00001"} <= page.ids
    assert "trials/a_00000.png" in page.images
    for name in page.images:
        assert png_size(index.parent / name)[0] >= 400
    assert {p.name for p in (run / "report").iterdir()} == {
        "index.html",
        "style.css",
        "learning_curves.png",
        "search_space.png",
        "confusion_matrix.png",
        "trials",
    }


def test_a_demo_page_has_the_mode_table_linking_each_row_to_its_run_and_the_reading(tmp_path):
    out = write_demo(tmp_path / "outputs" / "demo", tmp_path / "outputs" / "runs")
    page = Page(Path(draw_report(str(out))).read_text())
    modes = page.tables["modes"]
    assert [row[1] for row in modes] == ["random init", "partial", "partial", "feature extractor", "tune (lr 0.00056)"]
    assert modes[2][4] == "0.870"
    assert page.links[0] == "../../runs/r0/report/index.html"
    assert len(page.links) == 5
    assert sorted(page.images) == ["accuracy.png", "learning_curves.png"]


def test_the_demo_reading_says_where_transfer_pays_what_freezing_saves_and_how_the_search_did(tmp_path):
    rows = json.loads((write_demo(tmp_path / "demo", tmp_path) / "results.json").read_text())["rows"]
    assert reading_lines(rows) == [
        "new domain: the best frozen row (partial 2, 0.870) is 27.0 points above random init (0.600); "
        "full fine-tuning (0.850) is 25.0 points above random init (0.600).",
        "new domain: the feature extractor's epochs took 6.4x less time than full fine-tuning's "
        "(2.5 s against 16.0 s).",
        "new domain: the search (0.866) matches the best hand-picked row (partial 2, 0.870): -0.4 points.",
    ]
    rows[-1]["val_accuracy"] = 0.80
    assert reading_lines(rows)[-1].startswith("new domain: the search (0.800) falls short of the best hand-picked row")
    assert reading_lines(rows)[-1].endswith(": -7.0 points.")


def test_a_confusion_matrix_of_many_classes_is_drawn_at_a_bounded_size(tmp_path):
    classes = [f"class_{i}" for i in range(300)]
    matrix = [[3 if i == j else 0 for j in range(300)] for i in range(300)]
    plot_confusion({"classes": classes, "matrix": matrix}, tmp_path / "many.png")
    assert png_size(tmp_path / "many.png") == (1600, 1600)  # 16 inches at 100 dpi, not 137 inches
    plot_confusion({"classes": CLASSES, "matrix": MATRIX}, tmp_path / "few.png")
    assert png_size(tmp_path / "few.png") == (450, 450)


def test_report_names_what_a_folder_lacks(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "tune_results.json, results.json, metadata.json" in err


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("pages")
    return {
        "run": Path(draw_report(str(write_run(tmp_path / "job")))),
        "search": Path(draw_report(str(write_search(tmp_path / "search")))),
        "demo": Path(draw_report(str(write_demo(tmp_path / "outputs" / "demo", tmp_path / "outputs" / "runs")))),
    }


# the rows each kind of page must show: {table id: body rows}
EXPECTED_TABLES = {
    "run": {"epochs": 3, "per-class": 3, "freeze": 6, "timings": 3},
    "search": {"trials": 2},
    "demo": {"modes": 5},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_TABLES))
def test_each_kind_of_page_renders_in_a_browser(pages, browser, kind):
    # the model's files, each trial's curve and each demo row's run page are there: no link is broken
    checked = check_renders(browser, pages[kind], EXPECTED_TABLES[kind])
    assert all(width >= 400 for _, width in checked.images)
