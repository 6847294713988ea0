"""The dataset index of a local image folder: classes, the given splits, ignored files, fingerprints, data errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from tlray.data.errors import DataError
from tlray.data.index import DatasetIndex, build_index
from tlray.spec import DatasetSpec

from conftest import spec_dict, write_image_folder


def index_of(root: Path, **options) -> DatasetIndex:
    return build_index(DatasetSpec(uri=str(root), **options))


def test_class_folders_give_sorted_classes_and_a_split(image_folder):
    index = index_of(image_folder, val_fraction=0.25)
    assert index.classes == ["class_0", "class_1", "class_2"]
    assert len(index.train) + len(index.val) == 36
    assert index.val and index.train
    assert {key for key, _ in index.train}.isdisjoint(key for key, _ in index.val)
    assert all(key.split("/")[0] == index.classes[label] for key, label in index.train + index.val)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    write_image_folder(tmp_path / "d" / "train", classes=2, per_class=5)
    write_image_folder(tmp_path / "d" / "val", classes=2, per_class=2)
    index = index_of(tmp_path / "d")
    assert len(index.train) == 10 and len(index.val) == 4
    assert all(key.startswith("train/") for key, _ in index.train)


def test_hidden_and_system_files_are_ignored(image_folder):
    (image_folder / ".DS_Store").write_bytes(b"junk")
    (image_folder / "class_0" / "._000.png").write_bytes(b"junk")
    (image_folder / "_SUCCESS").write_text("")
    (image_folder / "README.md").write_text("about")
    (image_folder / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(image_folder / ".cache" / "x.png")
    index = index_of(image_folder)
    assert len(index.train) + len(index.val) == 36


def test_same_data_same_fingerprint(image_folder):
    assert index_of(image_folder).fingerprint == index_of(image_folder).fingerprint


def test_a_same_size_rewrite_is_new_data(tmp_path):
    from tlray.spec import JobSpec

    root = write_image_folder(tmp_path / "data", classes=2, per_class=6)
    image = root / "class_0" / "000.bmp"  # uncompressed: any content of the same size is the same length
    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    before = index_of(root)
    time.sleep(0.05)  # a later write, as a relabelled or re-exported image comes later
    Image.new("RGB", (16, 16), (200, 0, 0)).save(image)
    after = index_of(root)
    assert image.stat().st_size == 16 * 16 * 3 + 54  # the same size before and after
    assert after.fingerprint != before.fingerprint
    spec = JobSpec.model_validate(spec_dict(str(root), str(tmp_path / "out")))
    # a new run (not a resume of the old one), and --if-data-changed retrains
    assert spec.run_id_for("train", after.fingerprint) != spec.run_id_for("train", before.fingerprint)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no images"),
        (lambda root: write_image_folder(root, classes=1), "at least 2"),
    ],
    ids=["missing", "empty", "one-class"],
)
def test_data_errors_name_the_key(tmp_path, make, expected):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=expected) as error:
        index_of(root)
    assert str(error.value).startswith("dataset.uri:")


def test_a_class_with_only_validation_images_is_an_error(tmp_path):
    write_image_folder(tmp_path / "d" / "train", classes=2, per_class=3)
    write_image_folder(tmp_path / "d" / "val", classes=3, per_class=2)
    with pytest.raises(DataError, match="class_2 have no training images"):
        index_of(tmp_path / "d")
