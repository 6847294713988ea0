"""Datasets and runs in S3, end to end against a real S3 wire protocol on 127.0.0.1 (moto's server)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest
from PIL import Image

from tlray.cli import main
from tlray.data.index import build_index
from tlray.data.order import train_batches, train_rows
from tlray.spec import DatasetSpec

from conftest import spec_dict, write_image_folder, write_spec
from s3_fixtures import ACCESS_DENIED, FlakyProxy, upload_tree

pytestmark = pytest.mark.slow


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def keys_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    pages = s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def write_mixed_images(root: Path, per_class: int = 10) -> Path:
    """Three classes of solid colours in every PIL mode and several sizes, as a user's folder would be."""
    rng = random.Random(0)
    modes = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16"]
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            size = (rng.randint(12, 40), rng.randint(12, 40))
            image = Image.new("RGB", size, rgb)
            mode = modes[n % len(modes)]
            if mode == "I;16":
                image = image.convert("L").point(lambda v: v * 256, "I").convert("I;16")
            elif mode != "RGB":
                image = image.convert(mode)
            suffix = ".tiff" if mode == "CMYK" else (".jpg" if mode in ("RGB", "L") and n % 2 else ".png")
            image.save(root / name / f"{n:03d}{suffix}")
    return root


def s3_spec(tmp_path, endpoint, bucket, **sections) -> Path:
    spec = spec_dict(f"s3://{bucket}/images", f"s3://{bucket}/runs", **sections)
    spec["dataset"]["endpoint_url"] = endpoint
    return write_spec(tmp_path / "job.yaml", spec)


def test_s3_dataset_trains_and_publishes_to_s3(tmp_path, s3_env, s3_bucket, capsys):
    data = write_mixed_images(tmp_path / "images")
    (data / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / ".DS_Store").write_bytes(b"junk")
    upload_tree(s3_env, s3_bucket, "images/", data)

    with FlakyProxy(s3_env, fail_ratio=0.0) as counting:  # forwards everything, logs every request
        assert main(["train", str(s3_spec(tmp_path, counting.endpoint, s3_bucket))]) == 0
    out = capsys.readouterr().out
    assert "model published to s3://" in out
    # One GET per image read, no HEAD. A training image (the corrupt one too) is read once in each of the
    # 2 epochs whose permutation has it among the epoch's whole batches; a validation image once per pass
    # over the split (2 epochs, plus the champion gate's).
    reads = Counter((method, path) for method, path in counting.log if "/images/" in path.split("?")[0])
    assert {method for method, _ in reads} == {"GET"}
    index = build_index(DatasetSpec(uri=f"s3://{s3_bucket}/images", endpoint_url=s3_env, val_fraction=0.25))
    batch, steps = train_batches(len(index.train), 1, 8)
    expected = Counter(
        f"/{s3_bucket}/images/{index.train[row][0]}"
        for epoch in range(2)
        for row in train_rows(len(index.train), 0, epoch, 0, 1)[: batch * steps]
    )
    assert {path: n for (_, path), n in reads.items() if path in expected} == dict(expected)
    val_reads = {path: n for (_, path), n in reads.items() if path not in expected}
    assert set(val_reads) == {f"/{s3_bucket}/images/{key}" for key, _ in index.val}
    assert len(set(val_reads.values())) == 1 and min(val_reads.values()) >= 2, val_reads

    published = keys_under(s3_env, s3_bucket, "runs/")
    for name in ("metadata.json", "metrics.json", "model/model.pt2", "model/state_dict.pt"):
        assert any(k.endswith(name) for k in published), name
    assert any("/train/epoch_0002/" in k for k in published), "Ray Train checkpoints go to S3 too"
    metadata_key = next(k for k in published if k.endswith("metadata.json"))
    metadata = json.loads(s3(s3_env).get_object(Bucket=s3_bucket, Key=metadata_key)["Body"].read())
    assert metadata["classes"] == ["blue", "green", "red"]
    assert len(metadata["dataset"]["fingerprint"]) == 64
    assert metadata["dataset"]["bad_images"]["count"] == 1
    assert metadata["dataset"]["bad_images"]["examples"] == [f"s3://{s3_bucket}/images/red/corrupt.png"]

    # the run's report is uploaded with it, each file with its content type, as an S3 static website serves it
    report = metadata_key.rsplit("/", 1)[0] + "/report/"
    assert f"[tlray] report: s3://{s3_bucket}/{report}index.html" in out
    pages = [k for k in published if k.startswith(report) and not k.endswith("/")]  # pyarrow's folder markers
    types = {k[len(report) :]: s3(s3_env).head_object(Bucket=s3_bucket, Key=k)["ContentType"] for k in pages}
    assert types == {
        "index.html": "text/html",
        "style.css": "text/css",
        "curves.png": "image/png",
        "epoch_times.png": "image/png",
        "confusion_matrix.png": "image/png",
    }


def test_bad_image_with_on_bad_image_fail_is_exit_2_naming_the_key(tmp_path, s3_env, s3_bucket, capsys):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=8)
    (data / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    upload_tree(s3_env, s3_bucket, "images/", data)
    spec = s3_spec(tmp_path, s3_env, s3_bucket, dataset={"on_bad_image": "fail", "val_fraction": 0.5})
    assert main(["train", str(spec)]) == 2
    # Ray logs the worker's failure above it; tlray's own last word is one clear line
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tlray: error: dataset.on_bad_image: cannot decode s3://") and "broken.jpg" in last


def test_more_than_five_percent_bad_images_stops_the_run(tmp_path, s3_env, s3_bucket, capsys):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=10)
    for n in range(3):
        (data / "class_1" / f"bad{n}.png").write_bytes(b"garbage")
    upload_tree(s3_env, s3_bucket, "images/", data)
    assert main(["train", str(s3_spec(tmp_path, s3_env, s3_bucket, train={"epochs": 1}))]) == 2
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and "more than 5%" in err


def test_manifest_layout_csv_and_jsonl_index_alike_and_train(tmp_path, s3_env, s3_bucket, capsys):
    data = write_image_folder(tmp_path / "images" / "all", classes=2, per_class=10)
    upload_tree(s3_env, s3_bucket, "images/", tmp_path / "images")
    rows = [
        {
            "path": f"all/{p.parent.name}/{p.name}"
            if i % 2
            else f"s3://{s3_bucket}/images/all/{p.parent.name}/{p.name}",
            "label": "cat" if p.parent.name == "class_0" else "dog",
            "split": "val" if i % 4 == 0 else "train",
        }
        for i, p in enumerate(sorted(data.glob("*/*.png")))
    ]
    bodies = {
        "csv": "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows),
        "jsonl": "".join(json.dumps(r) + "\n" for r in rows),
    }
    indexes = {}
    for fmt, body in bodies.items():
        s3(s3_env).put_object(Bucket=s3_bucket, Key=f"images/index.{fmt}", Body=body.encode())
        dataset = DatasetSpec(
            uri=f"s3://{s3_bucket}/images", layout="manifest", manifest=f"index.{fmt}", endpoint_url=s3_env
        )
        indexes[fmt] = build_index(dataset)
    assert (indexes["csv"].classes, indexes["csv"].train, indexes["csv"].val) == (
        indexes["jsonl"].classes,
        indexes["jsonl"].train,
        indexes["jsonl"].val,
    )
    assert indexes["csv"].classes == ["cat", "dog"] and (len(indexes["csv"].train), len(indexes["csv"].val)) == (15, 5)
    # one training run: both formats index alike
    spec = s3_spec(
        tmp_path, s3_env, s3_bucket, dataset={"layout": "manifest", "manifest": "index.jsonl"}, train={"epochs": 1}
    )
    assert main(["validate", str(spec)]) == 0
    assert main(["train", str(spec)]) == 0
    assert "2 classes, 15 train / 5 val images" in capsys.readouterr().out


def bad_dataset_cases(bucket: str):
    """(name, how to set the bucket up, spec changes, text the message must contain)."""

    def put(*keys, body=b"x"):
        def setup(endpoint, tmp_path):
            for key in keys:
                s3(endpoint).put_object(Bucket=bucket, Key=key, Body=body)

        return setup

    def images(classes, per_class=4, prefix="images/", split=None):
        def setup(endpoint, tmp_path):
            root = write_image_folder(tmp_path / "up", classes=classes, per_class=per_class)
            upload_tree(endpoint, bucket, prefix, root)

        return setup

    def manifest(body):
        def setup(endpoint, tmp_path):
            images(2)(endpoint, tmp_path)
            put("images/index.csv", body=body.encode())(endpoint, tmp_path)

        return setup

    manifest_spec = {"dataset": {"layout": "manifest", "manifest": "index.csv"}}
    return [
        ("bucket-missing", None, {"dataset": {"uri": "s3://no-such-bucket/images"}}, ["dataset.uri", "no-such-bucket"]),
        ("prefix-empty", put("other/x.png"), {}, ["dataset.uri", "empty"]),
        ("one-class", images(1), {}, ["at least 2"]),
        (
            "class-without-training-images",
            _then(images(2, prefix="images/train/"), images(3, prefix="images/val/")),
            {},
            ["class_2", "no training images"],
        ),
        (
            "manifest-missing-columns",
            manifest("file,class\nclass_0/000.png,a\n"),
            manifest_spec,
            ["dataset.manifest", "path", "label"],
        ),
        (
            "manifest-path-missing",
            manifest("path,label\nclass_0/000.png,a\nclass_1/999.png,b\n"),
            manifest_spec,
            ["dataset.manifest", "999.png", "does not exist"],
        ),
        (
            "manifest-label-empty",
            manifest("path,label\nclass_0/000.png,a\nclass_1/000.png,\n"),
            manifest_spec,
            ["dataset.manifest", "empty label"],
        ),
        (
            "output-bucket-missing",
            images(2),
            {"output": {"uri": "s3://no-such-output/runs"}},
            ["output.uri", "no-such-output"],
        ),
    ]


def _then(*setups):
    def setup(endpoint, tmp_path):
        for one in setups:
            one(endpoint, tmp_path)

    return setup


def test_every_bad_s3_dataset_is_exit_2_and_writes_nothing(tmp_path, s3_env, s3_bucket, capsys):
    for name, setup, changes, expected in bad_dataset_cases(s3_bucket):
        case_dir = tmp_path / name
        case_dir.mkdir()
        for key in keys_under(s3_env, s3_bucket, ""):
            s3(s3_env).delete_object(Bucket=s3_bucket, Key=key)
        if setup:
            setup(s3_env, case_dir)
        before = set(keys_under(s3_env, s3_bucket, ""))
        spec = spec_dict(f"s3://{s3_bucket}/images", f"s3://{s3_bucket}/runs")
        spec["dataset"]["endpoint_url"] = s3_env
        for section, values in changes.items():
            spec[section] = {**spec[section], **values}
        assert main(["train", str(write_spec(case_dir / "job.yaml", spec))]) == 2, name
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, f"{name}: {text!r} not in {err}"
        assert "Traceback" not in err
        assert set(keys_under(s3_env, s3_bucket, "")) == before, f"{name}: something was written"


def test_unreachable_endpoint_denied_access_and_missing_credentials_are_exit_2(
    tmp_path, s3_env, s3_bucket, monkeypatch, capsys
):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    spec = spec_dict(f"s3://{s3_bucket}/images", str(tmp_path / "out"))
    spec["dataset"]["endpoint_url"] = dead
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main(["train", str(write_spec(tmp_path / "dead.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "dataset.endpoint_url" in err and dead in err and "Traceback" not in err

    with FlakyProxy(s3_env, fail_ratio=1.0, fail_status=403, fail_body=ACCESS_DENIED) as denied:
        spec["dataset"]["endpoint_url"] = denied.endpoint
        assert main(["train", str(write_spec(tmp_path / "denied.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "dataset.uri" in err and "denied" in err.lower() and "Traceback" not in err

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    spec["dataset"]["endpoint_url"] = s3_env
    assert main(["train", str(write_spec(tmp_path / "nocreds.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "credentials" in err and "IRSA" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_training_through_flaky_s3_completes_and_publishes(tmp_path, s3_env, s3_bucket, flaky_s3, capsys):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=12)
    upload_tree(s3_env, s3_bucket, "images/", data)
    proxy = flaky_s3
    assert main(["train", str(s3_spec(tmp_path, proxy.endpoint, s3_bucket))]) == 0
    assert "model published to s3://" in capsys.readouterr().out
    assert any(k.endswith("metadata.json") for k in keys_under(s3_env, s3_bucket, "runs/"))
    assert proxy.failures > 0, "the proxy must really have answered 503 SlowDown"


def test_a_30_second_outage_mid_epoch_loses_no_image(tmp_path, s3_env, s3_bucket, capsys):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=20)
    upload_tree(s3_env, s3_bucket, "images/", data)
    spec = s3_spec(tmp_path, "http://placeholder", s3_bucket, train={"epochs": 1, "batch_size": 8})
    with FlakyProxy(s3_env, fail_ratio=0.0) as proxy:
        # 15 s of 503 SlowDown, then 15 s of refused connections, starting at the 20th image read
        proxy.outage_after(20, unavailable_s=15, refused_s=15, scope="/images/")
        spec.write_text(spec.read_text().replace("http://placeholder", proxy.endpoint))
        started = time.monotonic()
        assert main(["train", str(spec)]) == 0, capsys.readouterr().err
    assert proxy.outage_started is not None and proxy.outage_ended - proxy.outage_started >= 30
    assert time.monotonic() - started > 30
    metadata = json.loads(
        s3(s3_env)
        .get_object(
            Bucket=s3_bucket, Key=next(k for k in keys_under(s3_env, s3_bucket, "runs/") if k.endswith("metadata.json"))
        )["Body"]
        .read()
    )
    final, train_images = metadata["metrics"], metadata["dataset"]["train_images"]
    assert final["bad_images"] == 0
    assert final["train_images"] == train_images // 8 * 8  # every full batch of the epoch trained
    assert 0 <= final["val_loss"] and final["val_accuracy"] >= 0
    outage_answers = [p for m, p in proxy.log if m == "GET" and "/images/" in p]
    assert len(outage_answers) > 60, "the reads failed during the outage and were retried"


def test_an_image_that_never_reads_stops_the_run_naming_it_and_publishes_nothing(tmp_path, s3_env, s3_bucket, capsys):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=10)
    upload_tree(s3_env, s3_bucket, "images/", data)
    broken = "images/class_1/003.png"
    with FlakyProxy(s3_env, fail_ratio=0.0, broken_paths=(broken,)) as proxy:
        spec = s3_spec(tmp_path, proxy.endpoint, s3_bucket, dataset={"read_retry_seconds": 1, "val_fraction": 0.5})
        assert main(["train", str(spec)]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tlray: error: I/O failure: cannot read s3://{s3_bucket}/{broken} after ")
    assert "HTTP 500 InternalError" in last and "resume" in last
    assert "decode" not in last  # an I/O failure is never reported as a bad image
    assert not any(k.endswith(("metadata.json", "metrics.json")) for k in keys_under(s3_env, s3_bucket, "runs/"))
    attempts = [p for m, p in proxy.log if p.endswith(broken)]
    assert len(attempts) >= 3  # retried within the task, and the task itself retried by Ray Data
