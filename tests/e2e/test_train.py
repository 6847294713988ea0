"""End to end on a real local Ray cluster: train on 2 CPU workers, export, reload without tlray, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tlray.artifacts.export import run_uri
from tlray.cli import main
from tlray.data.index import build_index
from tlray.data.order import train_rows
from tlray.data.pipeline import open_rgb
from tlray.io import mlflow
from tlray.metrics import select_epoch
from tlray.models import build
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import load_spec

from conftest import RAY_INTERNALS, Driver, spec_dict, write_image_folder, write_spec
from mlflow_fixtures import metric_steps, params_of, tags_of, tracked_runs

pytestmark = pytest.mark.slow

TLRAY = [sys.executable, "-m", "tlray"]


def run_dir(spec_path: Path, command: str = "train") -> Path:
    spec = load_spec(spec_path)
    return Path(run_uri(spec, build_index(spec.dataset), command))


def test_two_worker_run_exports_a_model_plain_pytorch_loads(tmp_path, capsys, mlflow_server):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=12)
    spec_path = write_spec(
        tmp_path / "job.yaml",
        spec_dict(
            str(data),
            str(tmp_path / "out"),
            name="tiny-tracked",
            scaling={"num_workers": 2, "cpus_per_worker": 0.5},
            train={"epochs": 2, "batch_size": 4},
            tracking={"mlflow": {"uri": mlflow_server}},
        ),
    )
    assert main(["train", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "model published to" in out and "val_accuracy" in out
    assert re.search(r"\[tlray\] timings: index [\d.]+ s, weights [\d.]+ s, cluster [\d.]+ s, .*gate [\d.]+ s", out)
    check_tracked(mlflow_server, run_dir(spec_path))

    run = run_dir(spec_path)
    metadata = json.loads((run / "metadata.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert metadata["classes"] == ["class_0", "class_1", "class_2"]
    assert metadata["spec"]["scaling"]["num_workers"] == 2
    assert set(metadata["versions"]) >= {"tlray", "torch", "torchvision", "ray"}
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"):
        assert all(key in h for h in history)
    assert "val_top5" not in history[-1]  # only with 5 or more classes

    # tlray's own predictions: the state_dict in a torchvision model, tlray's eval preprocessing
    images = sorted(data.glob("*/*.png"))[:6]
    transform = preprocessing_for("resnet18", 32).eval_transform()
    batch = torch.stack([transform(open_rgb(str(p))) for p in images])
    torch.save(batch, tmp_path / "batch.pt")
    model = build.build_model("resnet18", None, 3)
    model.load_state_dict(torch.load(run / "model" / "state_dict.pt", weights_only=True))
    expected = model.eval()(batch)

    # a fresh interpreter that only has torch: load the exported program, predict, prove tlray never loaded
    script = textwrap.dedent(
        f"""
        import sys, json, torch
        sys.modules["tlray"] = None  # any import of tlray now fails
        program = torch.export.load({str(run / "model" / "model.pt2")!r}).module()
        logits = program(torch.load({str(tmp_path / "batch.pt")!r}))
        print(json.dumps(logits.tolist()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    exported = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    assert torch.allclose(exported, expected, atol=1e-4)
    assert torch.equal(exported.argmax(1), expected.argmax(1))

    # the published epoch's validation confusion matrix: both workers' halves summed, as the model predicts them
    index = build_index(load_spec(spec_path).dataset)
    val_images = torch.stack([transform(open_rgb(index.location(key))) for key, _ in index.val])
    counts = [[0] * 3 for _ in range(3)]
    for (_, label), predicted in zip(index.val, model(val_images).argmax(1).tolist(), strict=True):
        counts[label][predicted] += 1
    confusion = json.loads((run / "confusion_matrix.json").read_text())
    assert confusion == {"classes": metadata["classes"], "matrix": counts, "epoch": metadata["selection"]["epoch"]}
    assert "[tlray] report: " + str(run / "report" / "index.html") in out


def check_tracked(uri: str, run: Path) -> None:
    """The run in MLflow: named by its run id, every epoch's metrics at its step, the spec as params, the
    published files as artifacts, and its model the registered `champion` (the job's first)."""
    metadata = json.loads((run / "metadata.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    (tracked,) = tracked_runs(uri, "tiny-tracked", {"tlray.run_id": run.name})
    assert tracked["info"]["run_name"] == run.name and tracked["info"]["status"] == "FINISHED"
    for key in ("val_accuracy", "train_loss"):
        assert metric_steps(uri, tracked["info"]["run_id"], key) == {h["epoch"]: [h[key]] for h in history}
    params = params_of(tracked)
    assert (params["scaling.num_workers"], params["train.epochs"], params["model.arch"]) == ("2", "2", "resnet18")
    assert (params["data_fingerprint"], params["weights_identity"]) == (metadata["dataset"]["fingerprint"], "none")
    assert tags_of(tracked)["tlray.model_uri"] == str(run / "model")
    # the run's timings: every part in metadata.json and as MLflow metrics (the gate's in MLflow only)
    parts = ["index", "weights", "cluster", "plan", "fit", "epochs", "publish"]  # no cache: no feature pass
    assert sorted(metadata["timings"]) == sorted(parts)
    assert all(seconds >= 0 for seconds in metadata["timings"].values())
    logged = {m["key"] for m in tracked["data"]["metrics"] if m["key"].startswith("seconds_")}
    assert logged == {f"seconds_{part}" for part in [*parts, "gate"]}
    listed = mlflow.Client(uri).call("GET", "artifacts/list", query={"run_id": tracked["info"]["run_id"]})
    assert {f["path"] for f in listed["files"]} == {"metadata.json", "confusion_matrix.json", "MANIFEST.json", "report"}
    query = {"run_id": tracked["info"]["run_id"], "path": "report"}
    listed = mlflow.Client(uri).call("GET", "artifacts/list", query=query)
    pages = {"index.html", "style.css", "curves.png", "epoch_times.png", "confusion_matrix.png"}
    assert {f["path"] for f in listed["files"]} == {f"report/{name}" for name in pages}
    query = {"name": "tiny-tracked", "alias": "champion"}
    champion = mlflow.Client(uri).call("GET", "registered-models/alias", query=query)["model_version"]
    assert (champion["version"], champion["run_id"]) == ("1", tracked["info"]["run_id"])


def test_run_terminated_after_first_epoch_resumes_from_its_checkpoint_and_frozen_prefix_cache(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=40, size=24, seed=11)
    torch.manual_seed(0)
    torch.save(build.build_model("resnet18", None, 1000).state_dict(), tmp_path / "weights.pt")
    model = {"arch": "resnet18", "weights": str(tmp_path / "weights.pt"), "mode": "partial", "freeze_depth": 2}
    spec_path = write_spec(
        tmp_path / "job.yaml",
        spec_dict(str(data), str(tmp_path / "out"), model=model, train={"epochs": 4, "batch_size": 4}),
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    # 1. Start training (with -v: Ray's own output too); SIGTERM it, as Kubernetes preempts a pod, right after
    # the first epoch's line: it stops well within Kubernetes' default 30 s grace, and that epoch is kept.
    first = Driver("-v", "train", str(spec_path))
    first.wait_for(r"\[tlray\] epoch 1/4")
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.finish(timeout=120) == 143, first.output
    stop_seconds = time.monotonic() - signalled
    assert stop_seconds < 30, f"SIGTERM to exit took {stop_seconds:.1f} s"
    assert "tlray: terminated (SIGTERM)" in first.output
    assert not (run_dir(spec_path) / "metadata.json").exists(), "an interrupted run must not publish"
    assert "(SingleWorker" in first.output  # -v: the one worker's actor's lines (Ray Data's too), live
    resume_at = newest_sealed_epoch(run_dir(spec_path) / "train")
    assert 1 <= resume_at < 4, "the first run must stop before finishing, with its first epoch kept"

    # 2. The same command again continues from that checkpoint.
    second = subprocess.run([*TLRAY, "train", str(spec_path)], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming after epoch {resume_at} of 4" in second.stdout
    # without -v: tlray's lines only; Ray's go to the run's ray.log (which also holds the first run's)
    assert not [line for line in second.stdout.splitlines() if any(i in line for i in RAY_INTERNALS)]
    assert f"Ray's output: {run_dir(spec_path) / 'ray.log'}" in second.stdout
    ray_log = (run_dir(spec_path) / "ray.log").read_text()
    assert "(SingleWorker" in ray_log and "Execution plan" in ray_log and "[tlray] epoch 4/4" in ray_log
    trained_now = [int(e) for e in re.findall(r"\[tlray\] epoch (\d+)/4", second.stdout)]
    assert trained_now == list(range(resume_at + 1, 5))
    history = json.loads((run_dir(spec_path) / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

    # 3. The resumed run computed the frozen blocks only for rows no earlier epoch had met: the
    # cache on this node outlived the stopped run, and its key (weights, data, cut) still matched.
    index = build_index(load_spec(spec_path).dataset)
    rows, seen, expected = len(index.train), set(), []
    for epoch in range(4):
        epoch_rows = {int(r) for r in train_rows(rows, 0, epoch, 0, 1)[: (rows // 4) * 4]}
        expected.append(len(epoch_rows - seen) + (len(index.val) if epoch == 0 else 0))
        seen |= epoch_rows
    computed = [h["feature_pass_images"] for h in history]
    assert computed[:resume_at] == expected[:resume_at]
    # (the stopped run may already have filled the next epoch's few new rows before it stopped)
    assert all(0 <= c <= e for c, e in zip(computed[resume_at:], expected[resume_at:], strict=True)), computed
    assert sum(expected[resume_at:]) < len(index.train) / 10  # a cold cache would compute all train and val rows

    # 4. A stop after the last checkpoint was sealed, before publish: the same command has no epoch left to
    # train, and publishes from the sealed epochs.
    run = run_dir(spec_path)
    for published in ("metadata.json", "metrics.json", "MANIFEST.json"):
        (run / published).unlink()
    third = subprocess.run([*TLRAY, "train", str(spec_path)], env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resuming after epoch 4 of 4" in third.stdout and "after 4 epochs" in third.stdout
    assert not re.findall(r"\[tlray\] epoch \d+/4", third.stdout)  # nothing trained twice
    assert json.loads((run / "metrics.json").read_text())["history"] == history
    selection = json.loads((run / "metadata.json").read_text())["selection"]
    assert selection["epoch"] == select_epoch(history, load_spec(spec_path).train.select_metric).epoch
    assert selection["reason"].endswith("of 4")
    # with the cache, the timings hold the feature pass: its seconds over the four epochs, within theirs
    timings = json.loads((run / "metadata.json").read_text())["timings"]
    assert timings["feature_pass"] == pytest.approx(sum(h["feature_pass_seconds"] for h in history))
    assert timings["epochs"] == pytest.approx(sum(h["epoch_seconds"] for h in history))


def newest_sealed_epoch(checkpoints: Path) -> int:
    """The newest epoch whose checkpoint is complete (its seal written after its state)."""
    return max((int(p.parent.name.split("_")[1]) for p in checkpoints.glob("epoch_*/sealed.json")), default=0)


def test_data_problems_stop_before_ray_with_exit_2(tmp_path, capsys):
    one_class = write_image_folder(tmp_path / "one", classes=1)
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(one_class): "at least 2",
        str(tmp_path / "empty"): "no images",
    }
    for uri, expected in cases.items():
        path = write_spec(tmp_path / "job.yaml", spec_dict(uri, str(tmp_path / "out")))
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert "dataset.uri" in err and expected in err and "Traceback" not in err
    path = write_spec(
        tmp_path / "job.yaml",
        spec_dict(
            str(one_class), str(tmp_path / "out"), model={"weights": "/nonexistent/r18.pt", "mode": "feature_extractor"}
        ),
    )
    write_image_folder(one_class, classes=2)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.weights" in err and "/nonexistent/r18.pt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"
