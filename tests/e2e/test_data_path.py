"""The data path at the sizes where its bugs show: a true shuffle every epoch, uint8 images that
match the float reference, every validation image exactly once, blocks that hold whole batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlray.data import pipeline
from tlray.data.index import build_index
from tlray.data.order import epoch_order, rank_shares, train_batches, train_rows, val_rows
from tlray.data.pipeline import data_source
from tlray.models import build
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import DatasetSpec

from conftest import write_image_folder

# chi-square critical value for 9 degrees of freedom at p = 0.001: a uniform shuffle exceeds it
# once in a thousand seeds; a class-sorted order exceeds it by orders of magnitude.
CHI2_9DF_P001 = 27.88


def class_mix_chi2(labels: np.ndarray, classes: int) -> float:
    counts = np.bincount(labels, minlength=classes)
    expected = len(labels) / classes
    return float(((counts - expected) ** 2 / expected).sum())


def test_every_epoch_is_a_uniform_shuffle_of_a_class_sorted_index():
    classes, per_class, batch = 10, 2_000, 32
    labels = np.repeat(np.arange(classes), per_class)  # the index's order: sorted by class
    first_batches = 20  # 640 rows: well inside what a 1,024-row local buffer would leave sorted
    for epoch in range(3):
        for rank in range(2):
            rows = train_rows(len(labels), seed=0, epoch=epoch, rank=rank, world_size=2)
            statistic = class_mix_chi2(labels[rows[: first_batches * batch]], classes)
            assert statistic < CHI2_9DF_P001, (epoch, rank, statistic)
    # the sorted order itself is what the statistic rejects
    assert class_mix_chi2(labels[: first_batches * batch], classes) > 100 * CHI2_9DF_P001


def test_epochs_differ_and_a_resumed_epoch_gets_its_own_order_back():
    first, second = epoch_order(20_000, seed=7, epoch=0), epoch_order(20_000, seed=7, epoch=1)
    assert sorted(first) == list(range(20_000)) and sorted(second) == list(range(20_000))
    assert (first != second).mean() > 0.99
    # a resumed run computes epoch 1's order without having run epoch 0 in this process
    assert np.array_equal(epoch_order(20_000, seed=7, epoch=1), second)
    assert not np.array_equal(epoch_order(20_000, seed=8, epoch=1), second)


def test_workers_get_equal_disjoint_train_shares_and_all_of_val_once():
    rows, world = 1_003, 4
    shares = [train_rows(rows, seed=1, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shares} == {rows // world}
    together = np.concatenate(shares)
    assert len(np.unique(together)) == len(together) == rows - rows % world
    val = np.concatenate([val_rows(rows, r, world) for r in range(world)])
    assert sorted(val) == list(range(rows))


def test_each_rank_keeps_a_seeded_random_share_in_a_new_order_every_epoch():
    classes, per_class, world, batch = 10, 2_000, 4, 32
    labels = np.repeat(np.arange(classes), per_class)  # class-sorted, as an index is
    rows = len(labels)
    shares = rank_shares(rows, seed=0, world_size=world)
    assert sorted(np.concatenate(shares).tolist()) == list(range(rows))  # a partition
    assert {len(s) for s in shares} == {rows // world}
    for share in shares:  # random, not a contiguous range: every share has every class in proportion
        assert class_mix_chi2(labels[share], classes) < CHI2_9DF_P001
        assert share.max() - share.min() > 0.99 * rows
    assert not np.array_equal(rank_shares(rows, seed=1, world_size=world)[0], shares[0])  # seeded
    assert all(np.array_equal(a, b) for a, b in zip(rank_shares(rows, 0, world), shares, strict=True))  # fixed

    orders = [[train_rows(rows, 0, epoch, rank, world) for rank in range(world)] for epoch in range(3)]
    for epoch in orders:
        for rank, order in enumerate(epoch):
            assert set(order.tolist()) <= set(shares[rank].tolist())
        # every step's global batch (one batch from each rank) mixes the classes
        step = np.concatenate([order[:batch] for order in epoch])
        assert class_mix_chi2(labels[step], classes) < CHI2_9DF_P001
    assert (orders[0][0] != orders[1][0]).mean() > 0.99  # a new order every epoch
    assert (orders[0][0] != orders[0][1]).mean() > 0.99  # ranks' orders independent


def test_over_a_run_the_ranks_meet_each_row_about_once_in_all():
    """What the frozen-prefix cache computes on k nodes, one rank each: the rows each rank meets.

    A global reshuffle every epoch would have each rank meet almost every row (k x the work)."""
    rows, world, batch, epochs = 10_007, 4, 32, 10
    per_epoch = batch * train_batches(rows, world, batch)[1]
    met = [set() for _ in range(world)]
    for epoch in range(epochs):
        for rank in range(world):
            met[rank] |= set(train_rows(rows, 0, epoch, rank, world)[:per_epoch].tolist())
    assert sum(map(len, met)) <= rows
    assert sum(map(len, met)) > 0.99 * rows  # the rows that sit out an epoch change: all are met


def test_one_worker_walks_the_whole_dataset_in_the_epoch_order():
    for epoch in range(3):
        assert np.array_equal(train_rows(1_000, 5, epoch, 0, 1), epoch_order(1_000, 5, epoch))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_source(local_ray, tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("imgs") / "images", classes=3, per_class=100, size=20)
    spec = DatasetSpec(uri=str(root), val_fraction=0.2, image_size=16)
    index = build_index(spec)
    return index, data_source(index, spec, preprocessing_for("resnet18", 16))


@pytest.fixture(autouse=True)
def _fresh_ray_per_test():  # this module shares one Ray (local_ray) instead of one per test
    yield


def test_pipeline_yields_the_permutation_in_order_in_whole_batches(small_source):
    index, source = small_source
    rows = train_rows(source.counts["train"], seed=3, epoch=1, rank=0, world_size=1)
    dataset = pipeline.image_dataset(source, "train", rows, batch_size=8, cluster_cpus=2)
    stats = dataset.materialize()
    assert stats.num_blocks() >= 8  # at least 4 blocks per CPU: both CPUs have work
    seen, sizes = [], []
    for batch in pipeline.iter_batches(source, "train", rows, 8, torch.device("cpu")):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 16, 16)
        seen += batch["row"].tolist()
        sizes.append(len(batch["row"]))
    assert seen == rows.tolist()
    assert sizes[:-1] == [8] * (len(sizes) - 1)
    labels = [label for _, label in index.train]
    assert [labels[r] for r in seen[:24]] != sorted(labels[r] for r in seen[:24])  # not class-sorted


def test_uint8_pipeline_predicts_what_the_float_reference_predicts(small_source):
    from tlray.data.pipeline import open_rgb

    index, source = small_source
    torch.manual_seed(0)
    model = build.build_model("resnet18", None, 3).eval()
    reference = source.preprocessing.eval_transform()
    expected = torch.stack([reference(open_rgb(index.location(key))) for key, _ in index.val])
    got, rows = [], []
    with torch.no_grad():
        rows_in_order = val_rows(source.counts["val"], 0, 1)
        for batch in pipeline.iter_batches(source, "val", rows_in_order, 16, torch.device("cpu")):
            got.append(model(source.preprocessing.normalise(batch["image"])))
            rows += batch["row"].tolist()
        want = model(expected)
    assert rows == list(range(len(index.val)))
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.cat(got).argmax(1), want.argmax(1))


def test_keys_travel_as_a_compact_table_not_as_the_index(small_source):
    index, source = small_source
    assert source.counts == {"train": len(index.train), "val": len(index.val)}
    assert [source.key("val", r) for r in range(len(index.val))] == [key for key, _ in index.val]
    assert not hasattr(source, "train") and not hasattr(source, "val")


def test_manifest_named_relative_to_the_dataset_is_found_there(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    (root / "manifest.csv").write_text(
        "path,label\n"
        + "".join(f"{p.relative_to(root).as_posix()},{p.parent.name}\n" for p in sorted(root.glob("*/*.png")))
    )
    monkeypatch.chdir(tmp_path)  # not the dataset folder: the name resolves under dataset.uri
    index = build_index(DatasetSpec(uri="images", layout="manifest", manifest="manifest.csv", val_fraction=0.25))
    assert len(index.train) + len(index.val) == 8


@pytest.mark.parametrize(
    "key, section",
    [
        ("dataset.uri", {"dataset": {"uri": "ftp://host/images"}}),
        ("dataset.manifest", {"dataset": {"uri": "d", "layout": "manifest", "manifest": "gs://b/m.csv"}}),
        ("model.weights", {"model": {"arch": "resnet18", "weights": "https://host/w.pt", "mode": "feature_extractor"}}),
        ("output.uri", {"output": {"uri": "hdfs://nn/out"}}),
    ],
)
def test_other_schemes_are_exit_2_naming_the_key(tmp_path, capsys, key, section):
    from tlray.cli import main

    from conftest import spec_dict, write_spec

    spec = spec_dict("data", "out", **section)
    assert main(["validate", str(write_spec(tmp_path / "job.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert f"{key}: '" in err and "s3://` URIs and local paths only" in err


def test_reads_arrive_as_they_complete_and_a_failed_read_is_an_io_failure(tmp_path):
    from tlray.errors import ReadFailure
    from tlray.io.fetch import read_as_completed

    root = write_image_folder(tmp_path / "images", classes=1, per_class=6)
    keys = [f"class_0/00{i}.png" for i in range(6)]
    got = dict(read_as_completed(str(root), keys, None, concurrency=4, retry_seconds=1))
    assert got == {i: (root / key).read_bytes() for i, key in enumerate(keys)}
    with pytest.raises(
        ReadFailure, match=r"I/O failure: cannot read .*class_0/gone.png after 1 attempt\(s\): FileNotFoundError"
    ):
        dict(read_as_completed(str(root), [keys[0], "class_0/gone.png"], None, concurrency=4, retry_seconds=5))


def write_colour_classes(root: Path, classes: int, per_class: int, size: int = 32, noise: int = 10) -> Path:
    """Noisy flat colours, one per class: separable by any feature extractor."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        colour = np.array([(37 * k * 7) % 256, (91 * k + 40) % 256, (173 * k + 90) % 256])
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = np.clip(colour + rng.integers(-noise, noise + 1, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{k}" / f"{n:04d}.png")
    return root


def calibrated_random_resnet18(images: torch.Tensor, path: Path) -> Path:
    """A stand-in for pretrained weights, made offline: random convolutions whose BatchNorm
    statistics are measured on the data, so the frozen features are well scaled."""
    torch.manual_seed(0)
    model = build.build_model("resnet18", None, 1000)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(64):
            model(chunk)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_one_feature_extractor_epoch_on_a_class_sorted_folder_learns_every_class(tmp_path, local_ray, capsys):
    import json

    from tlray.cli import main

    from conftest import spec_dict, write_spec

    # 2,400 images: more than twice the 1,024-row local shuffle buffer that used to be the only shuffle
    root = write_colour_classes(tmp_path / "images", classes=4, per_class=600)
    preprocessing = preprocessing_for("resnet18", 32)
    sample = [pipeline.open_rgb(str(p)) for p in sorted(root.glob("*/*.png"))[::8]]
    weights = calibrated_random_resnet18(
        torch.stack([preprocessing.eval_transform()(i) for i in sample]), tmp_path / "w.pt"
    )
    spec = spec_dict(
        str(root),
        str(tmp_path / "out"),
        model={"arch": "resnet18", "weights": str(weights), "mode": "feature_extractor"},
        train={"epochs": 1, "batch_size": 16, "lr": 0.01, "scheduler": "constant"},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
    )
    assert main(["train", str(write_spec(tmp_path / "job.yaml", spec))]) == 0
    metrics = json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())
    assert metrics["final"]["val_accuracy"] >= 0.97, metrics["final"]
    print(f"class-sorted folder, one feature-extractor epoch: val_accuracy {metrics['final']['val_accuracy']:.4f}")


@pytest.mark.parametrize(
    "node_cpus, workers, reserved, threads",
    [(2, 1, 1, 2), (2, 2, 0.5, 1), (16, 2, 1, 8), (8, 1, 12, 12), (3, 2, 1, 1)],
)
def test_cpu_workers_use_their_share_of_the_node_not_only_their_reservation(node_cpus, workers, reserved, threads):
    from tlray.training.setup import cpu_threads

    assert cpu_threads(node_cpus, workers, reserved) == threads
