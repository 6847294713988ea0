"""Scheduled retraining end to end on loopback S3 and a real local Ray: one tiny run is trained, published
with its best epoch and a MANIFEST, made champion; then `tlray evaluate` and `tlray predict` are checked
against the model run directly, `--if-data-changed` skips, and a warm start from `latest` with a new class
trains and wins the gate."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch

from tlray.artifacts import champion
from tlray.artifacts.manifest import manifest_digest, read_run_manifest
from tlray.artifacts.published import load_published
from tlray.cli import main
from tlray.data.pipeline import open_rgb
from tlray.io import storage
from tlray.metrics import select_epoch
from tlray.models import build

from conftest import spec_dict, write_image_folder, write_spec
from s3_fixtures import isolate_aws, raw_client, upload_tree

pytestmark = pytest.mark.slow

CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    """s3_env for a whole module: dummy credentials, no user AWS config, and one bucket."""
    from tlray.io import s3 as tlray_s3

    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        isolate_aws(patch, empty)
        tlray_s3.clear_client_cache()
        raw_client(s3_server).create_bucket(Bucket="tlray-retrain")
        yield s3_server, "tlray-retrain"
        tlray_s3.clear_client_cache()


# a small network: every model read goes through the in-process S3 server, which shares this process's GIL
ARCH = {"arch": "mobilenet_v3_small", "weights": "none", "mode": "architecture"}
HEAD = "classifier.3.weight"


def s3_job(tmp_path: Path, endpoint: str, bucket: str, name: str = "job.yaml", **sections) -> Path:
    sections["model"] = {**ARCH, **sections.get("model", {})}
    spec = spec_dict(f"s3://{bucket}/images", f"s3://{bucket}/out", **sections)
    spec["dataset"]["endpoint_url"] = endpoint
    return write_spec(tmp_path / name, spec)


@pytest.fixture(scope="module")
def champion_run(s3, tmp_path_factory):
    """One tiny run (3 epochs, keeping 1 checkpoint by val_loss) published to S3 and made champion."""
    endpoint, bucket = s3
    tmp = tmp_path_factory.mktemp("retrain")
    data = write_image_folder(tmp / "images", classes=3, per_class=12)
    upload_tree(endpoint, bucket, "images/", data)
    spec = s3_job(tmp, endpoint, bucket, train={"epochs": 3, "select_metric": "val_loss", "checkpoints_to_keep": 1})
    assert main(["train", str(spec)]) == 0
    job = f"s3://{bucket}/out/tiny"
    pointer, _ = champion.read_pointer(job, endpoint)
    return {
        "endpoint": endpoint,
        "bucket": bucket,
        "tmp": tmp,
        "data": data,
        "spec": spec,
        "job": job,
        "run": pointer.run,
        "pointer": pointer,
    }


def test_the_run_publishes_its_best_epoch_and_a_manifest_and_becomes_champion(champion_run):
    endpoint, run = champion_run["endpoint"], champion_run["run"]
    metadata = storage.read_json(f"{run}/metadata.json", endpoint)
    history = storage.read_json(f"{run}/metrics.json", endpoint)["history"]
    chosen = select_epoch(history, "val_loss")
    assert metadata["selection"]["epoch"] == chosen.epoch
    assert metadata["selection"]["reason"] == chosen.reason(3)
    assert metadata["metrics"] == history[chosen.epoch - 1]
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # the exported weights are that epoch's, and Ray kept its checkpoint though checkpoints_to_keep is 1
    kept = storage.list_tree(f"{run}/train", endpoint)
    assert f"epoch_{chosen.epoch:04d}/state.pt" in kept and "epoch_0003/state.pt" in kept
    checkpoint = torch.load(
        io.BytesIO(storage.read_bytes(f"{run}/train/epoch_{chosen.epoch:04d}/state.pt", endpoint)), weights_only=False
    )
    exported = torch.load(io.BytesIO(storage.read_bytes(f"{run}/model/state_dict.pt", endpoint)), weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in checkpoint["model"].items())

    manifest = read_run_manifest(run, endpoint)
    published = ["confusion_matrix.json", "metadata.json", "metrics.json", "model/model.pt2", "model/state_dict.pt"]
    assert sorted(manifest["files"]) == published  # not train/, nor report/
    pointer = champion_run["pointer"]
    assert pointer.dataset_fingerprint == metadata["dataset"]["fingerprint"]
    assert pointer.manifest_sha256 == manifest_digest(run, endpoint)
    assert [h["action"] for h in champion.read_history(champion_run["job"], endpoint)] == ["promoted"]


def direct_predictions(run: str, endpoint: str, keys: list[str], bucket: str) -> torch.Tensor:
    """Softmax of the published state_dict in a plain torchvision model, on the images preprocessed by hand."""
    metadata = storage.read_json(f"{run}/metadata.json", endpoint)
    model = build.build_model(metadata["arch"], None, len(metadata["classes"]))
    model.load_state_dict(
        torch.load(io.BytesIO(storage.read_bytes(f"{run}/model/state_dict.pt", endpoint)), weights_only=True)
    )
    pre = load_published(run, endpoint).preprocessing
    images = torch.stack(
        [
            pre.uint8_transform()(open_rgb(raw_client(endpoint).get_object(Bucket=bucket, Key=k)["Body"].read()))
            for k in keys
        ]
    )
    with torch.no_grad():
        return torch.softmax(model.eval()(pre.normalise(images)), dim=1)


def test_evaluate_latest_on_s3_matches_the_model_run_directly(champion_run, capsys):
    endpoint, bucket, job = champion_run["endpoint"], champion_run["bucket"], champion_run["job"]
    out = f"s3://{bucket}/eval/latest"
    assert (
        main(["evaluate", f"{job}/latest.json", f"s3://{bucket}/images", "--out", out, "--endpoint-url", endpoint]) == 0
    )
    assert "accuracy" in capsys.readouterr().out

    keys = sorted(o["Key"] for o in raw_client(endpoint).list_objects_v2(Bucket=bucket, Prefix="images/")["Contents"])
    probabilities = direct_predictions(champion_run["run"], endpoint, keys, bucket)
    labels = np.array([CLASSES.index(k.split("/")[1]) for k in keys])
    predicted = probabilities.argmax(1).numpy()
    expected_matrix = np.zeros((3, 3), int)
    np.add.at(expected_matrix, (labels, predicted), 1)

    report = storage.read_json(f"{out}/evaluation.json", endpoint)
    assert report["images"] == len(keys) == 36
    assert report["confusion_matrix"] == expected_matrix.tolist()
    assert report["accuracy"] == pytest.approx((predicted == labels).mean())
    tp = expected_matrix[1, 1]
    assert report["per_class"]["class_1"]["precision"] == pytest.approx(tp / max(expected_matrix[:, 1].sum(), 1))
    assert report["per_class"]["class_1"]["recall"] == pytest.approx(tp / expected_matrix[1].sum())
    assert storage.read_json(f"{out}/confusion_matrix.json", endpoint)["matrix"] == expected_matrix.tolist()
    assert storage.read_bytes(f"{out}/confusion_matrix.png", endpoint)[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_over_s3_writes_rows_that_match_the_model_and_an_error_row(champion_run, capsys):
    endpoint, bucket = champion_run["endpoint"], champion_run["bucket"]
    client = raw_client(endpoint)
    upload_tree(endpoint, bucket, "new/", champion_run["data"] / "class_1")
    client.put_object(Bucket=bucket, Key="new/deeper/broken.png", Body=b"not an image")
    out = f"s3://{bucket}/predictions/new.parquet"
    assert (
        main(
            [
                "predict",
                champion_run["run"],
                f"s3://{bucket}/new",
                "--out",
                out,
                "--top-k",
                "2",
                "--endpoint-url",
                endpoint,
            ]
        )
        == 0
    )
    assert "predicted 13/13 images" in capsys.readouterr().err

    table = pyarrow.parquet.read_table(io.BytesIO(storage.read_bytes(out, endpoint))).to_pylist()
    assert [r["path"] for r in table] == sorted(r["path"] for r in table)
    broken = [r for r in table if r["path"].endswith("broken.png")]
    assert broken == [
        {
            "path": f"s3://{bucket}/new/deeper/broken.png",
            "predicted_class": None,
            "top_k_classes": [],
            "top_k_probabilities": [],
            "error": "cannot decode image",
        }
    ]
    rows = [r for r in table if r["error"] is None]
    keys = [r["path"].removeprefix(f"s3://{bucket}/") for r in rows]
    expected = direct_predictions(champion_run["run"], endpoint, keys, bucket)
    top = expected.topk(2, dim=1)
    assert [r["top_k_classes"] for r in rows] == [[CLASSES[i] for i in t] for t in top.indices.tolist()]
    assert [r["predicted_class"] for r in rows] == [CLASSES[i] for i in top.indices[:, 0].tolist()]
    assert np.allclose([r["top_k_probabilities"] for r in rows], top.values.numpy(), atol=1e-5)

    csv_out = f"s3://{bucket}/predictions/new.csv"
    assert (
        main(["predict", champion_run["run"], f"s3://{bucket}/new", "--out", csv_out, "--endpoint-url", endpoint]) == 0
    )
    csv_rows = pyarrow.csv.read_csv(io.BytesIO(storage.read_bytes(csv_out, endpoint))).to_pylist()
    assert [r["predicted_class"] for r in csv_rows if r["path"] in {x["path"] for x in rows}] == [
        r["predicted_class"] for r in rows
    ]


def test_bad_model_or_data_is_exit_2_and_writes_nothing(champion_run, tmp_path, capsys):
    endpoint, run = champion_run["endpoint"], champion_run["run"]
    local = tmp_path / "copy"
    for path in read_run_manifest(run, endpoint)["files"]:
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(storage.read_bytes(f"{run}/{path}", endpoint))
    (local / "MANIFEST.json").write_bytes(storage.read_bytes(f"{run}/MANIFEST.json", endpoint))
    images = write_image_folder(tmp_path / "more", classes=5, per_class=2)

    assert main(["evaluate", str(local), str(images)]) == 2  # classes the model does not know
    assert "2 class(es) the model does not know: class_3, class_4" in capsys.readouterr().err

    program = local / "model" / "model.pt2"
    damaged = bytearray(program.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one bit flipped in the middle: same size, other bytes
    program.write_bytes(bytes(damaged))
    assert main(["predict", str(local), str(images), "--out", str(tmp_path / "p.parquet")]) == 2
    assert "model/model.pt2 does not match its MANIFEST.json" in capsys.readouterr().err

    (local / "MANIFEST.json").unlink()
    assert main(["evaluate", str(local), str(images), "--out", str(tmp_path / "eval")]) == 2
    assert "has no MANIFEST.json: the run is incomplete" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p.parquet").exists()


def test_if_data_changed_skips_when_the_data_is_the_champions(champion_run, capsys):
    endpoint, bucket = champion_run["endpoint"], champion_run["bucket"]
    before = storage.list_tree(f"s3://{bucket}/out", endpoint)
    assert main(["train", str(champion_run["spec"]), "--if-data-changed"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("[tlray] dataset unchanged since the champion")
    assert storage.list_tree(f"s3://{bucket}/out", endpoint) == before


def test_warm_start_from_latest_with_a_new_class_trains_and_wins_the_gate(champion_run, capsys):
    endpoint, bucket, job, tmp = (
        champion_run["endpoint"],
        champion_run["bucket"],
        champion_run["job"],
        champion_run["tmp"],
    )
    old = champion_run["run"]
    upload_tree(endpoint, bucket, "grown/", write_image_folder(tmp / "grown", classes=4, per_class=12))
    upload_tree(endpoint, bucket, "two-classes/", write_image_folder(tmp / "two", classes=2, per_class=6))
    # val_loss: the old champion gives class_3 probability 0, so on the grown validation split it must lose
    warm = {"model": {"weights": "latest", "mode": "partial", "freeze_depth": 0}, "publish": {"metric": "val_loss"}}

    removed = s3_job(tmp, endpoint, bucket, "removed.yaml", dataset={"uri": f"s3://{bucket}/two-classes"}, **warm)
    assert main(["train", str(removed)]) == 2
    assert f"model.weights: class(es) class_2 of {old} are not in dataset.uri" in capsys.readouterr().err

    spec_path = s3_job(tmp, endpoint, bucket, "warm.yaml", dataset={"uri": f"s3://{bucket}/grown"}, **warm)
    assert main(["train", str(spec_path)]) == 0
    assert f"warm start from {old} (3 classes, 4 now)" in capsys.readouterr().out
    pointer, _ = champion.read_pointer(job, endpoint)
    new = storage.read_json(f"{pointer.run}/metadata.json", endpoint)
    assert pointer.run != old and new["classes"] == CLASSES + ["class_3"]
    assert new["weights"].startswith(f"{job}/warm-start/")  # the resolved checkpoint, not the word "latest"
    start = torch.load(io.BytesIO(storage.read_bytes(new["weights"], endpoint)), weights_only=True)
    champion_weights = torch.load(
        io.BytesIO(storage.read_bytes(f"{old}/model/state_dict.pt", endpoint)), weights_only=True
    )
    assert torch.equal(start[HEAD][:3], champion_weights[HEAD])  # the champion's rows, by name
    assert start[HEAD].shape[0] == 4
    assert torch.equal(start["features.0.0.weight"], champion_weights["features.0.0.weight"])
    decision = champion.read_history(job, endpoint)[-1]
    assert (decision["action"], decision["champion"], decision["metric"]) == ("promoted", old, "val_loss")
    assert decision["champion_value"] == float("inf")
    assert math.isfinite(decision["value"])
