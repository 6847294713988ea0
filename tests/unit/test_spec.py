"""The job spec: every bad input is exit 2, names its key, and shows no traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tlray.cli import main
from tlray.spec import JobSpec, load_spec, validate_spec

from conftest import ROOT, spec_dict, write_spec


@pytest.fixture
def base(tmp_path: Path) -> dict:
    return spec_dict(str(tmp_path / "images"), str(tmp_path / "out"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pretrained(base: dict, **model) -> dict:
    base["model"] = {"arch": "resnet18", "weights": "DEFAULT", **model}
    return base


# (id, how to break the spec, text the message must contain — the offending key first)
BAD_SPECS = [
    ("name-uppercase", lambda s: s.update(name="Tiny"), ["name:", "DNS-1035"]),
    ("name-too-long", lambda s: s.update(name="a" * 42), ["name:", "at most 41"]),
    ("dataset-missing", lambda s: s.pop("dataset"), ["dataset: required"]),
    ("dataset-uri-missing", lambda s: s["dataset"].pop("uri"), ["dataset.uri: required"]),
    ("layout-unknown", lambda s: s["dataset"].update(layout="folders"), ["dataset.layout:"]),
    (
        "manifest-layout-without-manifest",
        lambda s: s["dataset"].update(layout="manifest"),
        ["dataset.manifest: required"],
    ),
    ("manifest-with-imagefolder", lambda s: s["dataset"].update(manifest="index.csv"), ["dataset.manifest:"]),
    ("val-fraction-above-1", lambda s: s["dataset"].update(val_fraction=1.5), ["dataset.val_fraction:"]),
    ("image-size-tiny", lambda s: s["dataset"].update(image_size=4), ["dataset.image_size:"]),
    ("on-bad-image-unknown", lambda s: s["dataset"].update(on_bad_image="ignore"), ["dataset.on_bad_image:"]),
    ("endpoint-not-url", lambda s: s["dataset"].update(endpoint_url="minio:9000"), ["dataset.endpoint_url:"]),
    (
        "endpoint-on-local-data",
        lambda s: s["dataset"].update(endpoint_url="http://127.0.0.1:9000"),
        ["dataset.endpoint_url:", "s3://"],
    ),
    ("arch-typo", lambda s: s["model"].update(arch="resnet19"), ["model.arch:", "resnet18"]),
    ("mode-unknown", lambda s: s["model"].update(mode="finetune"), ["model.mode:"]),
    ("architecture-with-pretrained", lambda s: s["model"].update(weights="DEFAULT"), ["model.weights:", "random init"]),
    (
        "feature-extractor-without-weights",
        lambda s: s["model"].update(mode="feature_extractor"),
        ["model.weights:", "pretrained"],
    ),
    ("partial-without-depth", lambda s: pretrained(s, mode="partial"), ["model.freeze_depth: required"]),
    (
        "depth-beyond-block-map",
        lambda s: pretrained(s, mode="partial", freeze_depth=9),
        ["model.freeze_depth:", "0..5"],
    ),
    ("depth-negative", lambda s: pretrained(s, mode="partial", freeze_depth=-1), ["model.freeze_depth:"]),
    ("depth-word", lambda s: pretrained(s, mode="partial", freeze_depth="half"), ["model.freeze_depth:"]),
    ("architecture-with-depth", lambda s: s["model"].update(freeze_depth=2), ["model.freeze_depth:"]),
    (
        "weights-name-unknown",
        lambda s: pretrained(s, mode="feature_extractor", weights="IMAGENET9K_V9"),
        ["model.weights:", "IMAGENET1K_V1"],
    ),
    ("batchnorm-unknown", lambda s: s["model"].update(batchnorm="fixed"), ["model.batchnorm:"]),
    ("epochs-zero", lambda s: s["train"].update(epochs=0), ["train.epochs:"]),
    ("warmup-not-shorter", lambda s: s["train"].update(warmup_epochs=2), ["train.warmup_epochs:", "train.epochs"]),
    ("optimizer-unknown", lambda s: s["train"].update(optimizer="adam"), ["train.optimizer:"]),
    ("lr-negative", lambda s: s["train"].update(lr=-0.1), ["train.lr:"]),
    ("lr-not-number", lambda s: s["train"].update(lr="fast"), ["train.lr:"]),
    ("fp16-on-cpu", lambda s: s["train"].update(amp="fp16"), ["train.amp:", "use_gpu"]),
    ("gpu-without-gpus", lambda s: s["scaling"].update(use_gpu=True, gpus_per_worker=0), ["scaling.gpus_per_worker:"]),
    (
        "gpu-fraction-with-two-workers",
        lambda s: s["scaling"].update(use_gpu=True, num_workers=2, gpus_per_worker=0.5),
        ["scaling.gpus_per_worker:", "0.5 with scaling.num_workers 2", "NCCL"],
    ),
    (
        "gpus-the-loop-never-uses",
        lambda s: s["scaling"].update(use_gpu=True, gpus_per_worker=2),
        ["scaling.gpus_per_worker:", "one GPU"],
    ),
    ("workers-zero", lambda s: s["scaling"].update(num_workers=0), ["scaling.num_workers:"]),
    ("tune-samples-zero", lambda s: s.update(tune={"num_samples": 0}), ["tune.num_samples:"]),
    ("tune-lr-reversed", lambda s: s.update(tune={"lr": {"min": 0.1, "max": 0.001}}), ["tune.lr:", "below"]),
    ("tune-lr-negative", lambda s: s.update(tune={"lr": {"min": -1, "max": 0.1}}), ["tune.lr.min:"]),
    (
        "tune-depth-outside",
        lambda s: pretrained(s, mode="partial", freeze_depth=1) and s.update(tune={"freeze_depth": [1, 7]}),
        ["tune.freeze_depth[1]:", "0..5"],
    ),
    ("tune-depth-needs-partial", lambda s: s.update(tune={"freeze_depth": [1, 2]}), ["tune.freeze_depth:", "partial"]),
    (
        "tune-fewer-samples-than-choices",
        lambda s: (
            pretrained(s, mode="partial", freeze_depth=1)
            and s.update(tune={"num_samples": 2, "freeze_depth": ["random", 1, "all"]})
        ),
        ["tune.num_samples:", "2 trials cannot try the 3 choices of tune.freeze_depth (random, 1, all)"],
    ),
    (
        "tune-choice-repeated",
        lambda s: (
            pretrained(s, mode="partial", freeze_depth=1) and s.update(tune={"freeze_depth": ["random", 2, "random"]})
        ),
        ["tune.freeze_depth[2]:", "repeats tune.freeze_depth[0] (random)"],
    ),
    (
        "tune-all-and-its-depth",  # resnet18 has 5 blocks: `all` is 5
        lambda s: pretrained(s, mode="partial", freeze_depth=1) and s.update(tune={"freeze_depth": [5, "all"]}),
        ["tune.freeze_depth[1]:", "repeats tune.freeze_depth[0] (5)"],
    ),
    (
        "tune-random-needs-partial",  # the other choices' pretrained weights: a search from random init is tune.lr
        lambda s: s.update(tune={"freeze_depth": ["random"]}),
        ["tune.freeze_depth:", "needs `model.mode: partial` (got 'architecture')"],
    ),
    (
        "random-is-no-model-freeze-depth",
        lambda s: pretrained(s, mode="partial", freeze_depth="random"),
        ["model.freeze_depth:"],
    ),
    (
        "cache-on-with-nothing-frozen-in-any-trial",
        lambda s: (
            pretrained(s, mode="partial", freeze_depth=1)
            and s.update(tune={"freeze_depth": ["random", 0]})
            or s["train"].update(cache="on")
        ),
        ["train.cache:", "nothing is frozen"],
    ),
    (
        "layer-decay-where-only-random-init-trains-blocks",  # `all` trains the head; random ignores the decay
        lambda s: (
            pretrained(s, mode="partial", freeze_depth=1)
            and s.update(tune={"freeze_depth": ["random", "all"]})
            or s["train"].update(layer_lr_decay=0.5)
        ),
        ["train.layer_lr_decay:", "freeze_depth `all` trains only the head"],
    ),
    ("tune-metric-unreported", lambda s: s.update(tune={"metric": "f1"}), ["tune.metric:", "val_accuracy"]),
    (
        "search-publishes-by-another-metric",
        lambda s: s.update(tune={"metric": "val_loss", "mode": "min"}),
        ["train.select_metric:", "'val_accuracy' differs from tune.metric 'val_loss'"],
    ),
    (
        "search-publishes-the-last-epoch",
        lambda s: s["train"].update(select_metric="last") or s.update(tune={}),
        ["train.select_metric:", "tune.metric 'val_accuracy'"],
    ),
    (
        "search-ranks-by-the-worst",
        lambda s: s["train"].update(select_metric="val_loss") or s.update(tune={"metric": "val_loss"}),
        ["tune.mode:", "val_loss needs `min`"],
    ),
    ("tune-grace-beyond-epochs", lambda s: s.update(tune={"grace_period": 5}), ["tune.grace_period:"]),
    (
        "vit-at-another-size",
        lambda s: pretrained(s, arch="vit_b_32", mode="partial", freeze_depth=3)["dataset"].update(image_size=64),
        ["dataset.image_size:", "vit_b_32", "224 px"],
    ),
    (
        "vit-below-its-weights-size",
        lambda s: pretrained(s, arch="vit_b_16", weights="IMAGENET1K_SWAG_E2E_V1", mode="feature_extractor")[
            "dataset"
        ].update(image_size=224),
        ["dataset.image_size:", "384 px"],
    ),
    (
        "convnext-below-32-px",
        lambda s: s["model"].update(arch="convnext_tiny") or s["dataset"].update(image_size=16),
        ["dataset.image_size:", "at least 32 px"],
    ),
    ("unknown-top-key", lambda s: s.update(trian={"epochs": 3}), ["trian: unknown key", "did you mean 'train'"]),
    ("unknown-nested-key", lambda s: s["train"].update(learning_rate=0.1), ["train.learning_rate: unknown key"]),
    (
        "credential-in-dataset",
        lambda s: s["dataset"].update(aws_secret_access_key="abc"),
        ["dataset.aws_secret_access_key:", "credential chain"],
    ),
    ("token-anywhere", lambda s: s["output"].update(auth_token="abc"), ["output.auth_token:", "IRSA"]),
    ("output-missing", lambda s: s.pop("output"), ["output: required"]),
    ("section-not-mapping", lambda s: s.update(train=[1, 2]), ["train:"]),
]


@pytest.mark.parametrize("case, mutate, expected", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_exits_2_and_names_the_key(tmp_path, capsys, base, case, mutate, expected):
    spec = copy.deepcopy(base)
    mutate(spec)
    code, out, err = run_cli(capsys, "validate", str(write_spec(tmp_path / "job.yaml", spec)))
    assert code == 2, err
    assert "Traceback" not in out + err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def test_every_problem_is_reported_at_once(tmp_path, capsys, base):
    base["name"] = "Bad_Name"
    base["train"].update(epochs=0, optimizer="adam")
    base["model"]["arch"] = "resnet19"
    base["scaling"].update(use_gpu=True, gpus_per_worker=0)
    code, _, err = run_cli(capsys, "validate", str(write_spec(tmp_path / "job.yaml", base)))
    assert code == 2
    for key in ("name:", "train.epochs:", "train.optimizer:", "model.arch:", "scaling.gpus_per_worker:"):
        assert key in err
    assert "5 problems" in err


def test_bad_override_is_exit_2(tmp_path, capsys, base):
    path = write_spec(tmp_path / "job.yaml", base)
    code, _, err = run_cli(capsys, "validate", str(path), "--set", "train.lr")
    assert code == 2 and "--set" in err and "key.path=value" in err
    code, _, err = run_cli(capsys, "validate", str(path), "--set", "train.lr=-1")
    assert code == 2 and "train.lr:" in err


def test_override_changes_the_value_and_the_run_id(tmp_path, base):
    path = write_spec(tmp_path / "job.yaml", base)
    plain = load_spec(path)
    changed = load_spec(path, ["train.lr=0.05", "scaling.num_workers=2"])
    assert changed.train.lr == 0.05 and changed.scaling.num_workers == 2
    assert plain.run_id_for("train", "data") != changed.run_id_for("train", "data")
    # deterministic: a re-run on the same data resumes the same run; new data is a new run
    assert load_spec(path).run_id_for("train", "data") == plain.run_id_for("train", "data")
    assert plain.run_id_for("train", "data") != plain.run_id_for("train", "new data")
    assert plain.run_id_for("tune", "data").startswith(f"{plain.name}-search-")


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "spec file not found"),
        ("", "empty"),
        ("# only a comment\n", "only comments"),
        ("name: x\ndataset:\n  uri: [unclosed\n", "invalid YAML at line"),
        ("- name: x\n- dataset: y\n", "a YAML mapping"),
    ],
    ids=["missing-file", "empty-file", "only-comments", "invalid-yaml", "list-not-mapping"],
)
def test_unreadable_spec_files(tmp_path, capsys, content, expected):
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert expected in err and "Traceback" not in out + err


def test_invalid_yaml_message_gives_the_line(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ndataset:\n  uri: data\n  layout: [imagefolder\nmodel: {}\n")
    _, _, err = run_cli(capsys, "validate", str(path))
    assert "invalid YAML at line 5" in err  # where PyYAML finds the unclosed '[' ends


SHIPPED_SPECS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_says_how_to_run_it(path, capsys):
    assert path.read_text().startswith("# Run: "), "every spec in jobs/ starts with the command that runs it"
    assert isinstance(load_spec(path), JobSpec)
    code, out, _ = run_cli(capsys, "validate", str(path))
    assert code == 0 and "valid job spec" in out


def test_validate_lists_the_block_map(tmp_path, capsys, base):
    pretrained(base, mode="partial", freeze_depth=2)
    code, out, _ = run_cli(capsys, "validate", str(write_spec(tmp_path / "job.yaml", base)))
    assert code == 0
    assert "frozen blocks: 2 of 5" in out
    assert "stem" in out and "layer4" in out


def test_freeze_depth_follows_the_mode(base):
    assert JobSpec.model_validate(base).freeze_depth == 0
    assert JobSpec.model_validate(pretrained(copy.deepcopy(base), mode="feature_extractor")).freeze_depth == 5
    assert JobSpec.model_validate(pretrained(copy.deepcopy(base), mode="partial", freeze_depth="all")).freeze_depth == 5
    assert JobSpec.model_validate(pretrained(copy.deepcopy(base), mode="partial", freeze_depth=3)).freeze_depth == 3


def test_readme_spec_reference_is_generated_from_the_fields():
    from tlray.spec import reference_markdown

    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- spec-reference:begin -->\n", "<!-- spec-reference:end -->"
    assert begin in readme and end in readme
    embedded = readme.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == reference_markdown(), (
        "README spec reference is stale: paste `tlray reference` between the markers"
    )


def test_every_field_is_described():
    from pydantic import BaseModel

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for t in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    walk(JobSpec)


@pytest.mark.parametrize(
    ("arch", "weights", "image_size"),
    [
        ("vit_b_32", "DEFAULT", 224),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 384),
        ("vit_h_14", "IMAGENET1K_SWAG_LINEAR_V1", 224),
        ("vit_h_14", "/models/vit_h_14.pt", 224),  # a checkpoint loads into the 224 px build
        ("convnext_tiny", "DEFAULT", 32),
        ("resnet18", "DEFAULT", 8),
    ],
)
def test_image_sizes_the_model_runs_at_are_valid(base, arch, weights, image_size):
    pretrained(base, arch=arch, weights=weights, mode="feature_extractor")["dataset"]["image_size"] = image_size
    assert validate_spec(base).dataset.image_size == image_size  # the cross-field rules included


@pytest.mark.parametrize(("use_gpu", "num_workers", "gpus_per_worker"), [(True, 1, 0.5), (True, 4, 1), (False, 2, 0.5)])
def test_gpu_shares_that_work_are_valid(base, use_gpu, num_workers, gpus_per_worker):
    base["scaling"] = {"use_gpu": use_gpu, "num_workers": num_workers, "gpus_per_worker": gpus_per_worker}
    assert validate_spec(base).scaling.gpus_per_worker == gpus_per_worker


def test_a_search_may_try_random_init_beside_freeze_depths(base):
    pretrained(base, mode="partial", freeze_depth=2)
    base["train"].update(epochs=4, unfreeze_every=1, layer_lr_decay=0.5)  # for the pretrained trials
    base["tune"] = {"num_samples": 5, "freeze_depth": ["random", 0, 2, 4, "all"]}
    assert validate_spec(base).tune.freeze_depth == ["random", 0, 2, 4, "all"]
    base["tune"]["num_samples"] = 7  # more trials than choices: the first choices get a second one
    assert validate_spec(base).tune.num_samples == 7


def test_validate_shows_how_many_trials_each_choice_gets(tmp_path, capsys, base):
    pretrained(base, mode="partial", freeze_depth=2)
    base["tune"] = {"num_samples": 7, "freeze_depth": ["random", 0, 2, 4, "all"]}
    code, out, _ = run_cli(capsys, "validate", str(write_spec(tmp_path / "job.yaml", base)))
    assert code == 0
    assert "  search: 7 trials, freeze_depth random x2, 0 x2, 2 x1, 4 x1, all x1\n" in out


def test_a_search_ranks_and_publishes_by_one_metric(base):
    from tlray import metrics, spec

    base["train"]["select_metric"] = "val_loss"
    base["tune"] = {"metric": "val_loss", "mode": "min"}
    assert validate_spec(base).tune.metric == "val_loss"
    assert spec.metric_mode is metrics.metric_mode  # the rule and epoch selection agree on directions


# (id, how to break the spec, text the message must contain): discriminative rates and gradual unfreezing
UNFREEZING_SPECS = [
    ("unfreeze-to-alone", lambda s: s["train"].update(unfreeze_to=1), ["train.unfreeze_to:", "unfreeze_every"]),
    (
        "unfreeze-from-random-init",
        lambda s: s["train"].update(unfreeze_every=1),
        ["train.unfreeze_every:", "mode 'architecture'", "nothing is frozen"],
    ),
    (
        "unfreeze-a-feature-extractor",
        lambda s: pretrained(s, mode="feature_extractor") and s["train"].update(unfreeze_every=1),
        ["train.unfreeze_every:", "mode 'feature_extractor'", "`freeze_depth: all`"],
    ),
    (
        "unfreeze-to-beyond-block-map",
        lambda s: (
            pretrained(s, mode="partial", freeze_depth="all") and s["train"].update(unfreeze_every=1, unfreeze_to=5)
        ),
        ["train.unfreeze_to:", "5 is outside 0..4"],
    ),
    (
        "unfreeze-to-not-below-depth",
        lambda s: pretrained(s, mode="partial", freeze_depth=2) and s["train"].update(unfreeze_every=1, unfreeze_to=2),
        ["train.unfreeze_to:", "2 is not below model.freeze_depth 2"],
    ),
    (
        "unfreeze-to-not-below-tuned-depths",
        lambda s: (
            pretrained(s, mode="partial", freeze_depth=2)
            and s.update(tune={"freeze_depth": [1, 2]})
            or s["train"].update(unfreeze_every=1, unfreeze_to=3)
        ),
        ["train.unfreeze_to:", "not below every tune.freeze_depth"],
    ),
    (
        "unfreeze-after-the-last-epoch",
        lambda s: pretrained(s, mode="partial", freeze_depth=3) and s["train"].update(unfreeze_every=2),
        ["train.unfreeze_every:", "(2 >= 2)"],
    ),
    (
        "cache-on-while-unfreezing",
        lambda s: pretrained(s, mode="partial", freeze_depth=3) and s["train"].update(unfreeze_every=1, cache="on"),
        ["train.cache:", "`auto` (cached until then)"],
    ),
    ("layer-decay-zero", lambda s: s["train"].update(layer_lr_decay=0), ["train.layer_lr_decay:"]),
    ("layer-decay-above-1", lambda s: s["train"].update(layer_lr_decay=1.5), ["train.layer_lr_decay:"]),
    (
        "layer-decay-of-a-feature-extractor",
        lambda s: pretrained(s, mode="feature_extractor") and s["train"].update(layer_lr_decay=0.5),
        ["train.layer_lr_decay:", "mode 'feature_extractor' trains only the head"],
    ),
    (
        "layer-decay-with-every-block-frozen",
        lambda s: pretrained(s, mode="partial", freeze_depth="all") and s["train"].update(layer_lr_decay=0.5),
        ["train.layer_lr_decay:", "freeze_depth `all` trains only the head"],
    ),
]


@pytest.mark.parametrize("case, mutate, expected", UNFREEZING_SPECS, ids=[c[0] for c in UNFREEZING_SPECS])
def test_bad_unfreezing_specs_exit_2_and_name_the_key(tmp_path, capsys, base, case, mutate, expected):
    test_bad_spec_exits_2_and_names_the_key(tmp_path, capsys, base, case, mutate, expected)


def test_unfreezing_from_the_head_with_layer_decay_is_valid_and_validate_shows_when_each_block_unfreezes(
    tmp_path, capsys, base
):
    pretrained(base, mode="partial", freeze_depth="all")
    base["train"].update(epochs=6, unfreeze_every=2, unfreeze_to=3, layer_lr_decay=0.5)
    train = validate_spec(copy.deepcopy(base)).train
    assert [train.freeze_depth_at(5, epoch) for epoch in range(6)] == [5, 5, 4, 4, 3, 3]
    assert [train.freeze_depth_at(2, epoch) for epoch in range(6)] == [2] * 6  # a trial starting below unfreeze_to
    code, out, _ = run_cli(capsys, "validate", str(write_spec(tmp_path / "job.yaml", base)))
    assert code == 0
    assert "frozen blocks: 5 of 5" in out
    assert "  3 layer2                   frozen, lr x 0.125" in out
    assert "  4 layer3                   unfreezes at epoch 5, lr x 0.25" in out
    assert "  5 layer4                   unfreezes at epoch 3, lr x 0.5" in out


def test_tracking_is_not_part_of_the_run_and_needs_a_server(tmp_path, capsys, base, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plain = JobSpec.model_validate(base)
    tracked = JobSpec.model_validate({**base, "tracking": {"mlflow": {"uri": "http://mlflow:5000"}}})
    assert tracked.run_id_for("train", "data") == plain.run_id_for("train", "data")  # tracking added: same run
    assert (tracked.tracking.mlflow.experiment, tracked.tracking.mlflow.log_weights) == (None, False)

    path = write_spec(tmp_path / "job.yaml", {**base, "tracking": {"mlflow": {}}})
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert "tracking.mlflow.uri: no tracking server: set it (e.g. `http://mlflow:5000`) or the MLFLOW_TRACKING" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    from_environment = load_spec(path).tracking.mlflow
    assert (from_environment.uri, from_environment.server) == (None, "http://tracking.example:5000")
    assert load_spec(path, ["tracking.mlflow.uri=http://other:80"]).tracking.mlflow.server == "http://other:80"

    for mlflow, expected in (
        ({"uri": "databricks"}, "tracking.mlflow.uri: 'databricks': tlray talks to a tracking server over http(s)"),
        ({"url": "http://x:5000"}, "tracking.mlflow.url: unknown key; did you mean 'uri'?"),
    ):
        path = write_spec(tmp_path / "job.yaml", {**base, "tracking": {"mlflow": mlflow}})
        code, _, err = run_cli(capsys, "validate", str(path))
        assert code == 2 and expected in err, err
