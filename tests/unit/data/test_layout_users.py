"""`tlray evaluate` and `tlray predict` index data with the same listing and layout rules as training."""

from __future__ import annotations

import pytest

from tlray.data.errors import DataError
from tlray.data.index import build_index
from tlray.flows.evaluate import labelled_index
from tlray.flows.predict import image_index
from tlray.spec import DatasetSpec

from conftest import write_image_folder


def test_evaluate_labels_every_image_by_the_models_classes(tmp_path):
    write_image_folder(tmp_path / "d" / "train", classes=2, per_class=3)
    write_image_folder(tmp_path / "d" / "val", classes=2, per_class=2)
    trained = build_index(DatasetSpec(uri=str(tmp_path / "d")))
    index = labelled_index(DatasetSpec(uri=str(tmp_path / "d")), ["class_1", "class_0", "class_9"])
    assert index.train == [] and sorted(index.val) == index.val
    assert {key for key, _ in index.val} == {key for key, _ in trained.train + trained.val}
    assert all(index.classes[label] == key.split("/")[1] for key, label in index.val)


def test_evaluate_reads_a_manifest_and_refuses_unknown_classes(image_folder):
    (image_folder / "m.csv").write_text("path,label\nclass_0/000.png,cat\nclass_1/000.png,dog\n")
    spec = DatasetSpec(uri=str(image_folder), layout="manifest", manifest="m.csv")
    assert labelled_index(spec, ["dog", "cat"]).val == [("class_0/000.png", 1), ("class_1/000.png", 0)]
    with pytest.raises(DataError, match="DATA_URI: 1 class"):
        labelled_index(spec, ["cat"])


def test_predict_takes_every_image_at_any_depth(tmp_path):
    write_image_folder(tmp_path / "d" / "a" / "b", classes=1, per_class=2)
    (tmp_path / "d" / "top.png").write_bytes((tmp_path / "d" / "a" / "b" / "class_0" / "000.png").read_bytes())
    index = image_index(str(tmp_path / "d"), None, ["x"])
    assert index.val == [("a/b/class_0/000.png", 0), ("a/b/class_0/001.png", 0), ("top.png", 0)]


@pytest.mark.parametrize(
    "index",
    [lambda uri: labelled_index(DatasetSpec(uri=uri), ["a"]), lambda uri: image_index(uri, None, ["a"])],
    ids=["evaluate", "predict"],
)
def test_no_images_names_data_uri(tmp_path, index):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="^DATA_URI: no images"):
        index(str(tmp_path / "d"))
