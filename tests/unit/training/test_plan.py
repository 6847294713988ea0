"""The run plan: resolved once on the driver, the workers' only input (its use end to end: every training test)."""

from __future__ import annotations

import hashlib
import pickle

import torch

from tlray.data.pipeline import DataSource
from tlray.models import build
from tlray.plan import Weights, plan_run, weights_of
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import JobSpec

from conftest import spec_dict
from s3_fixtures import raw_client


def source(classes=("a", "b", "c")) -> DataSource:
    preprocessing = preprocessing_for("resnet18", 32)
    counts = {"train": 9, "val": 3}
    return DataSource("/data", None, classes, counts, "f00d", None, preprocessing, False, "skip", 4, 30.0)


def test_the_plan_holds_what_workers_and_publish_need_and_derives_each_trials(tmp_path):
    torch.save(build.build_model("resnet18", None, 1000).state_dict(), tmp_path / "w.pt")
    model = {"arch": "resnet18", "weights": str(tmp_path / "w.pt"), "mode": "partial", "freeze_depth": 2}
    spec = JobSpec.model_validate(spec_dict(str(tmp_path), str(tmp_path / "out"), model=model))
    driver_model = build.build_model("resnet18", str(tmp_path / "w.pt"), 3)
    plan = plan_run(spec, source(), "/out/tiny/runs/tiny-1234", driver_model)

    digest = hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert plan.weights == Weights(str(tmp_path / "w.pt"), f"sha256 {digest}")
    assert (plan.run_id, plan.checkpoints_uri) == ("tiny-1234", "/out/tiny/runs/tiny-1234/train")
    assert plan.classes == ("a", "b", "c") and plan.preprocessing.crop_size == 32
    assert (plan.freeze.depth, plan.freeze.frozen_blocks) == (2, ["stem", "layer1"])
    assert pickle.loads(pickle.dumps(plan)) == plan  # what Ray sends each worker

    deeper = JobSpec.model_validate(spec_dict(str(tmp_path), str(tmp_path / "out"), model={**model, "freeze_depth": 4}))
    trial = plan.for_trial(deeper, "abc_00001", runs_at_once=2)
    assert (trial.checkpoints_uri, trial.runs_at_once, trial.spec) == (
        "/out/tiny/runs/tiny-1234/trials/abc_00001",
        2,
        deeper,
    )
    assert trial.freeze == plan.freeze  # a trial's workers count their own; publishing the best recounts:
    best = plan.for_best_trial(deeper, driver_model, "abc_00001")
    assert (best.freeze.depth, best.freeze.frozen_blocks) == (4, ["stem", "layer1", "layer2", "layer3"])
    assert best.checkpoints_uri == trial.checkpoints_uri  # what publish reads the best epoch from
    assert best.freeze.trainable_params < plan.freeze.trainable_params


def test_weights_identity_by_kind(tmp_path, s3_env, s3_bucket):
    def spec(weights: str) -> JobSpec:
        model = {"arch": "resnet18", "weights": weights, "mode": "architecture" if weights == "none" else "partial"}
        data = spec_dict(f"s3://{s3_bucket}/images", "s3://b/out", model=model)
        data["dataset"]["endpoint_url"] = s3_env
        return JobSpec.model_validate(data)

    raw_client(s3_env).put_object(Bucket=s3_bucket, Key="w.pt", Body=b"weights")
    etag = hashlib.md5(b"weights").hexdigest()
    assert weights_of(spec(f"s3://{s3_bucket}/w.pt")) == Weights(f"s3://{s3_bucket}/w.pt", f"etag {etag}")
    assert weights_of(spec("none")) is None
