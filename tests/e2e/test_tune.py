"""`tlray tune` end to end on this 2-CPU machine: ASHA, resume, results, report, the published best model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tlray.artifacts.export import run_uri
from tlray.cli import main
from tlray.data.index import build_index
from tlray.data.pipeline import open_rgb
from tlray.io import mlflow
from tlray.models import build, layout
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import load_spec

from conftest import Driver, spec_dict, write_image_folder, write_spec
from mlflow_fixtures import metric_steps, params_of, tags_of, tracked_runs

pytestmark = pytest.mark.slow


def search_spec(tmp_path: Path, train: dict | None = None, scaling: dict | None = None, **tune) -> Path:
    data = write_image_folder(tmp_path / "images", classes=3, per_class=12)
    weights = tmp_path / "pretrained_resnet18.pt"  # a stand-in for downloaded ImageNet weights
    torch.save(build.build_model("resnet18", None, 1000).state_dict(), weights)
    spec = spec_dict(
        str(data),
        str(tmp_path / "out"),
        model={"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": 1},
        train={"epochs": 3, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0, **(train or {})},
        scaling={"num_workers": 1, "cpus_per_worker": 0.5, **(scaling or {})},
    )
    spec["tune"] = {
        "num_samples": 4,
        "lr": {"min": 1e-4, "max": 0.5},
        "freeze_depth": [1, "all"],
        "scheduler": "asha",
        "grace_period": 1,
        **tune,
    }
    return write_spec(tmp_path / "search.yaml", spec)


def run_dir(spec_path: Path) -> Path:
    spec = load_spec(spec_path)
    return Path(run_uri(spec, build_index(spec.dataset), "tune"))


def check_search(spec_path: Path, out: str) -> None:
    """A finished ASHA search (tests/e2e/test_readme.py runs the README's, on 2 CPUs): its table, results, report and
    published best trial agree with each other and with what it printed."""
    spec = load_spec(spec_path)
    run = run_dir(spec_path)
    epochs = spec.train.epochs

    # the table, best first
    table = out[out.index("trial  ") :].splitlines()
    assert "stopped early" in table[0]
    results = json.loads((run / "tune_results.json").read_text())
    trials = results["trials"]
    assert len(trials) == spec.tune.num_samples and len(table) >= len(trials) + 1
    assert [line.split()[0] for line in table[1 : len(trials) + 1]] == [t["trial"] for t in trials]
    assert [line.split()[2] for line in table[1 : len(trials) + 1]] == [str(t["freeze_depth"]) for t in trials]
    check_trial_choices(run, spec, trials)
    assert [t["best_metric"] for t in trials] == sorted((t["best_metric"] for t in trials), reverse=True)
    for t in trials:
        assert 1 <= t["epochs"] <= epochs and t["status"] == "done"
        assert t["stopped_early"] == (t["epochs"] < epochs)
        assert [h["epoch"] for h in t["history"]] == list(range(1, t["epochs"] + 1))
    assert any(t["stopped_early"] for t in trials), "ASHA stops the worse trials at its rungs"
    csv_lines = (run / "tune_results.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["trial", "lr", "freeze_depth"] and len(csv_lines) == len(trials) + 1

    # the best trial, published like `tlray train` with its hyper-parameters
    best = trials[0]
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["hyperparameters"]["trial"] == best["trial"]
    assert metadata["hyperparameters"]["lr"] == pytest.approx(best["lr"])
    check_published_trial(run, spec, best)
    assert metadata["spec"]["train"]["lr"] == pytest.approx(best["lr"])
    # the trial's best epoch (train.select_metric: val_accuracy) is what is published
    assert metadata["metrics"]["val_accuracy"] == pytest.approx(best["best_metric"])
    # the search's timings, each part once (their sizes are the benchmark's business)
    assert sorted(metadata["timings"]) == ["cluster", "index", "plan", "publish", "search", "weights"]
    assert all(seconds >= 0 for seconds in metadata["timings"].values())

    # ... and its exported program reproduces the reported metric on the validation split
    index = build_index(spec.dataset)
    transform = preprocessing_for(spec.model.arch, spec.dataset.image_size).eval_transform()
    images = torch.stack([transform(open_rgb(index.location(key))) for key, _ in index.val])
    labels = torch.tensor([label for _, label in index.val])
    program = torch.export.load(str(run / "model" / "model.pt2")).module()
    accuracy = (program(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(best["best_metric"], abs=1e-6)

    # the report: real PNGs of a sensible size, referenced by index.html, every trial's curve linked from its row
    report = run / "report"
    page = (report / "index.html").read_text()
    for name in ("learning_curves.png", "search_space.png", "confusion_matrix.png"):
        with Image.open(report / name) as png:
            assert png.format == "PNG" and png.width >= 400 and png.height >= 300
        assert (report / name).stat().st_size > 5_000
        assert f'src="{name}"' in page
    for t in trials:
        assert f'<a href="#trial-{t["trial"]}">' in page
        assert (report / "trials" / f"{t['trial']}.png").stat().st_size > 5_000
    assert f'<p id="gate" class="promoted">champion gate (gate): promoted {run.name}' in page  # the job's first
    # the published epoch's validation, as the loop counted it, agrees with the accuracy it reported
    confusion = json.loads((run / "confusion_matrix.json").read_text())
    assert sum(map(sum, confusion["matrix"])) == len(index.val)
    correct = sum(confusion["matrix"][i][i] for i in range(len(confusion["classes"])))
    assert correct / len(index.val) == pytest.approx(best["best_metric"], abs=1e-9)
    assert confusion["epoch"] == metadata["selection"]["epoch"]


def check_trial_choices(run: Path, spec, trials: list[dict]) -> None:
    """Every tune.freeze_depth choice got its trials (num_samples of them in all), and each trial trained as its
    trial.json says: `random` from random init, the others from the search's weights."""
    from collections import Counter

    assert Counter(str(t["freeze_depth"]) for t in trials) == Counter(map(str, spec.trial_choices))
    assert "random" in {t["freeze_depth"] for t in trials}
    blocks = len(layout.backbone_block_names(spec.model.arch))
    for t in trials:
        settings = json.loads((run / "trials" / t["trial"] / "trial.json").read_text())
        assert settings["choice"] == t["freeze_depth"] and settings["lr"] == pytest.approx(t["lr"])
        if t["freeze_depth"] == "random":
            assert (settings["mode"], settings["weights"], settings["weights_identity"]) == ("architecture", None, None)
            assert (settings["freeze_depth"], settings["frozen_blocks"]) == (0, [])
        else:
            depth = blocks if t["freeze_depth"] == "all" else t["freeze_depth"]
            assert (settings["mode"], settings["weights"]) == ("partial", spec.model.weights)
            assert settings["weights_identity"].startswith("sha256 ")
            assert (settings["freeze_depth"], len(settings["frozen_blocks"])) == (depth, depth)


def check_published_trial(run: Path, spec, best: dict) -> None:
    """The published model says how the best trial trained: from random init (no weights), or its freeze depth."""
    metadata = json.loads((run / "metadata.json").read_text())
    blocks = len(layout.backbone_block_names(spec.model.arch))
    if best["freeze_depth"] == "random":
        assert (metadata["mode"], metadata["weights"], metadata["weights_identity"]) == ("architecture", "none", None)
        assert (metadata["freeze_depth"], metadata["frozen_parameters"]) == (0, 0)
    else:
        assert (metadata["mode"], metadata["weights"]) == ("partial", spec.model.weights)
        assert metadata["weights_identity"].startswith("sha256 ")
        assert metadata["freeze_depth"] == (blocks if best["freeze_depth"] == "all" else best["freeze_depth"])


def test_killed_trials_restart_and_a_stopped_search_resumes_instead_of_starting_over(tmp_path):
    # no cache: every epoch runs the frozen blocks, so the trials are still training when the first epoch ends
    spec_path = search_spec(
        tmp_path,
        train={"epochs": 3, "cache": "off"},
        scaling={"max_failures": 1},
        scheduler="none",
        num_samples=2,
        freeze_depth=[1, 2],
    )
    trials_dir = run_dir(spec_path) / "trials"

    first = Driver("tune", str(spec_path))
    first.wait_for(r"trial (\w+): epoch 1/3")  # a trial's first epoch is checkpointed
    # a one-worker trial trains in its Tune trial's process: killed, Tune restarts it from its checkpoint
    killed = trial_processes()
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    first.wait_for(r"resuming after epoch 1 of 3", timeout=120)
    assert not set(trial_processes()) & set(killed)
    first.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert first.finish(timeout=180) == 130, first.output
    assert "tlray: interrupted; run the same command again to resume" in first.output
    assert not (run_dir(spec_path) / "metadata.json").exists()
    started_trials = {p.name for p in trials_dir.iterdir()}

    second = subprocess.run(
        [sys.executable, "-m", "tlray", "tune", str(spec_path)], capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search" in second.stdout
    results = json.loads((run_dir(spec_path) / "tune_results.json").read_text())
    assert len(results["trials"]) == 2, "a resumed search runs the same 2 trials, not 2 more"
    assert started_trials <= {p.name for p in trials_dir.iterdir()}
    assert re.search(r"resuming after epoch [12] of 3", second.stdout), "an interrupted trial resumes its training"


def trial_processes() -> list[int]:
    """The processes of the running Tune trials (Ray titles them after the trainable's class)."""
    listed = subprocess.run(["pgrep", "-f", "^ray::ImplicitFunc"], capture_output=True, text=True).stdout
    return [int(pid) for pid in listed.split()]


@pytest.mark.parametrize(
    "tune, expected",
    [
        ({"freeze_depth": [1, 9]}, "tune.freeze_depth[1]"),
        ({"num_samples": 0}, "tune.num_samples"),
        ({"lr": {"min": 0.1, "max": 0.01}}, "tune.lr"),
        ({"lr": {"min": 0, "max": 0.01}}, "tune.lr.min"),
        ({"metric": "f1_score"}, "tune.metric"),
        ({"metric": "val_top5"}, "val_top5 is only reported with 5 or more classes"),  # train.select_metric too
    ],
    ids=[
        "depth-outside-block-map",
        "no-samples",
        "lr-reversed",
        "lr-not-positive",
        "unreported-metric",
        "top5-with-3-classes",
    ],
)
def test_bad_search_input_is_exit_2_before_ray_starts(tmp_path, capsys, tune, expected):
    import ray

    train = {"select_metric": tune["metric"]} if "metric" in tune else None  # a search publishes by its metric
    assert main(["tune", str(search_spec(tmp_path, train, **tune))]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not ray.is_initialized()  # every search input, the metric included, is checked before Ray starts


def test_tune_without_a_tune_section_is_exit_2(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images")
    path = write_spec(tmp_path / "job.yaml", spec_dict(str(data), str(tmp_path / "out")))
    assert main(["tune", str(path)]) == 2
    assert "tune: the spec has no tune section" in capsys.readouterr().err


def test_make_scheduler_builds_hyperband_from_the_spec(tmp_path):
    from ray.tune.schedulers import HyperBandScheduler

    from tlray.spec import JobSpec
    from tlray.training import search

    def hyperband(epochs: int, reduction_factor: int) -> JobSpec:
        tune_section = {"scheduler": "hyperband", "reduction_factor": reduction_factor}
        return JobSpec.model_validate(spec_dict(str(tmp_path), "out", train={"epochs": epochs}, tune=tune_section))

    scheduler = search.make_scheduler(hyperband(epochs=4, reduction_factor=2), concurrency=3)
    assert isinstance(scheduler, HyperBandScheduler) and scheduler.concurrency == 3
    assert (scheduler._time_attr, scheduler._max_t_attr, scheduler._eta) == ("training_iteration", 4, 2)
    assert scheduler.set_search_properties("val_accuracy", "max")  # metric and mode come from the Tuner alone
    assert search.scheduler_name(hyperband(epochs=4, reduction_factor=2)) == (
        "synchronous HyperBand, rungs from epoch 1, keeps 1/2 per rung; a trial at a rung pauses until its "
        "bracket catches up"
    )
    assert search.scheduler_name(hyperband(epochs=27, reduction_factor=3)).startswith(
        "synchronous HyperBand, rungs from epoch 1,"
    )
    assert search.scheduler_name(hyperband(epochs=2, reduction_factor=3)) == (
        "HyperBand, which stops no trial early: 2 epochs < reduction factor 3"
    )


def test_hyperband_search_stops_one_trial_at_its_rung_and_publishes_a_fully_trained_one(tmp_path, mlflow_server):
    # 2 epochs, factor 2: HyperBand puts 2 trials in a bracket that runs both 2 epochs, and 2 in one that
    # pauses the first at epoch 1 until the other gets there, then lets the better one go on. val_loss has
    # no ties, so the trial stopped at epoch 1 (worse than the one that went on) cannot rank first.
    spec_path = two_epochs(
        search_spec(
            tmp_path,
            {"select_metric": "val_loss"},
            scheduler="hyperband",
            reduction_factor=2,
            metric="val_loss",
            mode="min",
            freeze_depth=["random", 1, "all"],  # 4 trials: random init's twice
        ),
        tracking={"mlflow": {"uri": mlflow_server, "experiment": "hyperband"}},
    )
    assert main(["tune", str(spec_path)]) == 0

    run = run_dir(spec_path)
    results = json.loads((run / "tune_results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 4 and all(t["status"] == "done" for t in trials)
    assert sorted(t["epochs"] for t in trials) == [1, 2, 2, 2]
    for t in trials:
        assert t["stopped_early"] == (t["epochs"] == 1)
        assert [h["epoch"] for h in t["history"]] == list(range(1, t["epochs"] + 1))  # no epoch lost to a pause
    best = trials[0]
    assert best["epochs"] == 2 and best["best_metric"] == min(t["best_metric"] for t in trials)
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["hyperparameters"]["trial"] == best["trial"]
    assert (run / "model" / "model.pt2").stat().st_size > 0
    check_trial_choices(run, load_spec(spec_path), trials)
    check_published_trial(run, load_spec(spec_path), best)
    check_tracked_search(mlflow_server, run, trials)


def check_tracked_search(uri: str, run: Path, trials: list[dict]) -> None:
    """The search in MLflow: a parent run with the best trial, one finished child per trial with the epochs
    Tune saw at their steps (a trial paused at its rung may log an epoch it trains again twice), and the
    published model the registered `champion`."""
    (parent,) = tracked_runs(uri, "hyperband", {"tlray.run_id": run.name})
    parent_id = parent["info"]["run_id"]
    assert tags_of(parent)["tlray.best_trial"] == trials[0]["trial"]
    assert params_of(parent)["tune.scheduler"] == "hyperband"
    children = {tags_of(c)["tlray.trial"]: c for c in tracked_runs(uri, "hyperband", {"mlflow.parentRunId": parent_id})}
    assert sorted(children) == sorted(t["trial"] for t in trials)
    for t in trials:
        child = children[t["trial"]]
        assert child["info"]["status"] == "FINISHED"
        assert float(params_of(child)["train.lr"]) == pytest.approx(t["lr"])
        logged = metric_steps(uri, child["info"]["run_id"], "val_loss")
        assert sorted(logged) == [h["epoch"] for h in t["history"]]
        for h in t["history"]:
            assert h["val_loss"] in logged[h["epoch"]]
    champion = mlflow.Client(uri).call("GET", "registered-models/alias", query={"name": "tiny", "alias": "champion"})
    assert champion["model_version"]["run_id"] == parent_id


def two_epochs(spec_path: Path, **sections) -> Path:
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["train"]["epochs"] = 2
    spec.update(sections)
    return write_spec(spec_path, spec)
