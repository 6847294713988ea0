"""Random augmentation is a function of (train.seed, epoch, row): reproducible whichever task decodes an image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tlray.data.index import build_index
from tlray.data.pipeline import DecodeBatch, data_source
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import DatasetSpec

from conftest import write_image_folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import ray

    ray.init(num_cpus=1, include_dashboard=False)  # data_source puts the keys in the object store
    try:
        root = write_image_folder(tmp_path_factory.mktemp("aug") / "images", classes=2, per_class=20, size=48)
        spec = DatasetSpec(uri=str(root), val_fraction=0.2, augment=True)
        index = build_index(spec)
        yield data_source(index, spec, preprocessing_for("resnet18", 32), seed=3)
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _fresh_ray_per_test():  # the module shares one Ray (see `source`)
    yield


def decode(source, rows, epochs, split="train") -> dict[int, np.ndarray]:
    pairs = np.stack([np.asarray(rows), np.asarray(epochs)], axis=1)
    out = DecodeBatch(source, split)({"data": pairs})
    return {int(row): image for row, image in zip(out["row"], out["image"], strict=True)}


def test_an_images_augmentation_depends_on_seed_epoch_and_row_only(source):
    rows = np.arange(12)
    alone = decode(source, rows, [1] * 12)
    # the same rows in another batch: reversed, among other rows, some from another epoch
    mixed = decode(source, [*rows[::-1], 20, 21], [1] * 12 + [2, 2])
    assert all(np.array_equal(alone[r], mixed[r]) for r in rows)

    next_epoch = decode(source, rows, [2] * 12)
    assert sum(not np.array_equal(alone[r], next_epoch[r]) for r in rows) >= 10  # a new crop and flip per epoch
    other_seed = decode(dataclasses.replace(source, seed=4), rows, [1] * 12)
    assert sum(not np.array_equal(alone[r], other_seed[r]) for r in rows) >= 10


def test_without_augmentation_every_epoch_decodes_the_same_image(source):
    plain = dataclasses.replace(source, augment=False)
    first, later = decode(plain, range(6), [0] * 6), decode(plain, range(6), [5] * 6)
    assert all(np.array_equal(first[r], later[r]) for r in range(6))
    validation = decode(source, range(6), [3] * 6, split="val")  # never augmented
    again = decode(source, range(6), [4] * 6, split="val")
    assert all(np.array_equal(validation[r], again[r]) for r in range(6))
