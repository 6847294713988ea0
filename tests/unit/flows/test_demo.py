"""How `tlray demo` builds its jobs: the rows, the specs (local and --s3) and the table, without Ray.
The whole demo runs, at --quick size, in tests/e2e/test_readme.py (`make demo`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlray.flows import demo

from conftest import ROOT
from s3_fixtures import raw_client


def plan(tmp_path: Path, **changes) -> demo.DemoPlan:
    base = demo.DemoPlan(ROOT / "jobs", tmp_path / "data", tmp_path / "outputs" / "demo", 10, 3, False, None, None)
    return demo.dataclasses.replace(base, **changes)


@pytest.mark.parametrize("target", demo.TARGETS, ids=lambda t: t.spec)
def test_every_target_runs_in_the_three_modes_at_several_depths(tmp_path, target):
    rows = demo.mode_overrides(plan(tmp_path), target, "/w/source.pt")
    specs = [demo.job_spec(plan(tmp_path), target.spec, "/images", *row, f"name=t-{i}") for i, row in enumerate(rows)]
    assert [(s.model.mode, s.freeze_depth) for s in specs] == [
        ("architecture", 0),
        ("partial", 0),
        ("partial", 2),
        ("partial", 4),
        ("feature_extractor", 5),
    ]
    assert [s.model.weights for s in specs] == ["none"] + ["/w/source.pt"] * 4
    assert all(s.tune is None and s.train.seed == 3 and s.dataset.uri == "/images" for s in specs)
    assert {s.job_uri for s in specs} == {str(tmp_path / "outputs" / f"t-{i}") for i in range(5)}


def test_the_search_keeps_the_target_specs_tune_section_and_quick_shrinks_it(tmp_path):
    target = demo.TARGETS[0]
    full = demo.job_spec(plan(tmp_path), target.spec, "/images", "model.weights=/w.pt")
    assert full.tune.freeze_depth == ["random", 0, 2, 4, "all"] and full.tune.num_samples == 5
    assert full.train.epochs == 8
    quick = demo.job_spec(plan(tmp_path, quick=True), target.spec, "/images", "model.weights=/w.pt")
    assert (quick.tune.freeze_depth, quick.tune.num_samples, quick.tune.grace_period) == (["random", "all"], 2, 1)
    assert quick.train.epochs == 2
    source = demo.job_spec(plan(tmp_path, quick=True), target.source_spec, "/images", "tune=null")
    assert (source.model.mode, source.tune, source.train.epochs) == ("architecture", None, 2)


def test_with_s3_every_job_reads_and_writes_the_loopback_store(tmp_path, s3_env, s3_bucket):
    s3 = plan(tmp_path, s3=f"s3://{s3_bucket}", endpoint_url=s3_env)
    folder = tmp_path / "digits-new-domain"
    for split, digit, n in (("train", 3, 1), ("val", 3, 2), ("val", 7, 3)):
        (folder / split / str(digit)).mkdir(parents=True, exist_ok=True)
        (folder / split / str(digit) / f"{n}.png").write_bytes(b"png")
    uri = demo.upload(s3, folder)
    assert uri == f"s3://{s3_bucket}/data/digits-new-domain"
    listed = raw_client(s3_env).list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow also writes folder markers
    assert keys == [f"data/digits-new-domain/{k}" for k in ("train/3/1.png", "val/3/2.png", "val/7/3.png")]
    spec = demo.job_spec(s3, "digits-new-domain", uri, "tune=null")
    assert (spec.dataset.uri, spec.dataset.endpoint_url) == (uri, s3_env)
    assert spec.job_uri == f"s3://{s3_bucket}/outputs/digits-new-domain"


def test_the_table_has_a_row_per_job(tmp_path):
    row = demo.Row("new domain", "partial", 2, 11024138, 0.8577, 15.84, 34.2, "/r", 0.001, [0.5, 0.8577])
    tune = demo.dataclasses.replace(row, mode="tune", lr=0.00056)
    picked_random = demo.dataclasses.replace(row, mode="tune", freeze_depth=0, lr=0.0021, random_init=True)
    assert demo.table([row, tune, picked_random]).splitlines() == [
        "| target | mode | freeze depth | trainable params | val accuracy | train s | wall s |",
        "|---|---|---|---|---|---|---|",
        "| new domain | partial | 2 | 11,024,138 | 0.858 | 15.8 | 34 |",
        "| new domain | tune (lr 0.00056) | 2 | 11,024,138 | 0.858 | 15.8 | 34 |",
        "| new domain | tune (lr 0.0021, random init) | 0 | 11,024,138 | 0.858 | 15.8 | 34 |",
    ]


def test_the_demo_needs_its_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(demo.UserError, match=r"run it from a tlray checkout"):
        demo.demo(10, 0, False, True)
