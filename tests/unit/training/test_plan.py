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
    assert trial.weights == plan.weights  # resolved once, on the driver
    # each trial's own depth, counted on a parameter-less model; publishing the best recounts on the driver's:
    assert (trial.freeze.depth, trial.freeze.frozen_blocks) == (4, ["stem", "layer1", "layer2", "layer3"])
    best = plan.for_best_trial(deeper, driver_model, "abc_00001")
    assert best.freeze == trial.freeze
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


def test_a_random_init_trial_starts_from_no_weights_with_nothing_frozen(tmp_path):
    from tlray.training.search import trial_settings, trial_spec

    torch.save(build.build_model("resnet18", None, 1000).state_dict(), tmp_path / "w.pt")
    model = {"arch": "resnet18", "weights": str(tmp_path / "w.pt"), "mode": "partial", "freeze_depth": 2}
    train = {"layer_lr_decay": 0.5, "unfreeze_every": 1, "unfreeze_to": 1}
    tune = {"num_samples": 3, "freeze_depth": ["random", 2, "all"]}
    spec = JobSpec.model_validate(spec_dict(str(tmp_path), str(tmp_path / "out"), model=model, train=train, tune=tune))
    driver_model = build.build_model("resnet18", str(tmp_path / "w.pt"), 3)
    plan = plan_run(spec, source(), "/out/tiny/runs/tiny-1234", driver_model)

    random_init = trial_spec(spec, {"lr": 0.002, "freeze_depth": "random"})
    assert (random_init.model.mode, random_init.model.weights, random_init.model.freeze_depth) == (
        "architecture",
        "none",
        None,
    )
    assert (random_init.train.lr, random_init.train.unfreeze_every, random_init.train.layer_lr_decay) == (
        0.002,
        None,  # every block trains from the first epoch: nothing to unfreeze
        1.0,  # and at train.lr: layer decay spares pretrained blocks, and there are none
    )
    trial = plan.for_trial(random_init, "abc_00000", runs_at_once=1)
    assert trial.weights is None
    assert (trial.freeze.depth, trial.freeze.frozen_blocks, trial.freeze.frozen_params) == (0, [], 0)
    assert trial.freeze.trainable_params == plan.freeze.trainable_params + plan.freeze.frozen_params
    assert trial_settings(trial, "random") == {
        "choice": "random",
        "mode": "architecture",
        "weights": None,
        "weights_identity": None,
        "freeze_depth": 0,
        "frozen_blocks": [],
        "lr": 0.002,
    }
    best = plan.for_best_trial(random_init, driver_model, "abc_00000")  # what publish writes in metadata.json
    assert (best.weights, best.freeze.depth, best.spec.model.mode) == (None, 0, "architecture")

    pretrained = plan.for_trial(trial_spec(spec, {"lr": 0.002, "freeze_depth": "all"}), "abc_00002", 1)
    assert pretrained.weights == plan.weights and pretrained.freeze.depth == 5
    assert trial_settings(pretrained, "all")["weights"] == str(tmp_path / "w.pt")
    # the pretrained trials keep the search's unfreezing and layer decay
    assert (pretrained.spec.train.unfreeze_every, pretrained.spec.train.layer_lr_decay) == (1, 0.5)
