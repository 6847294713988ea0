"""The dataset index of a local image folder: layouts, the stable split, data errors, decoding."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from tlray.data.dataset import DataError, DatasetIndex, build_index, in_val_split, open_rgb
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


def test_adding_files_never_moves_an_existing_file_between_splits(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=30)
    before = index_of(root, split_seed=7)
    write_image_folder(tmp_path / "more", classes=2, per_class=60, seed=1)
    for path in (tmp_path / "more").glob("*/*.png"):
        path.rename(root / path.parent.name / f"new_{path.name}")
    after = index_of(root, split_seed=7)
    assert set(before.val) <= set(after.val)
    assert set(before.train) <= set(after.train)
    assert len(after.train) + len(after.val) == 180
    assert before.fingerprint != after.fingerprint


def test_split_seed_changes_the_split_and_fraction_is_respected():
    keys = [f"c/{i}.png" for i in range(4000)]
    val = [k for k in keys if in_val_split(k, 0, 0.2)]
    assert 0.17 < len(val) / len(keys) < 0.23
    assert val != [k for k in keys if in_val_split(k, 1, 0.2)]


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


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_image_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (5, 3)).save(path)
    image = open_rgb(str(path))
    assert image.mode == "RGB" and image.size == (5, 3)


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("P", (4, 4), color) for color in (1, 2)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert open_rgb(str(tmp_path / "a.gif")).size == (4, 4)


def manifest_index(root: Path, name: str, body: str) -> DatasetIndex:
    (root / name).write_text(body)
    return index_of(root, layout="manifest", manifest=str(root / name))


def test_manifest_csv_and_jsonl_give_the_same_index(image_folder):
    rows = [(f"class_{k}/{n:03d}.png", f"c{k}", "val" if n < 3 else "train") for k in range(3) for n in range(12)]
    csv_index = manifest_index(
        image_folder, "index.csv", "path,label,split\n" + "".join(f"{p},{label},{s}\n" for p, label, s in rows)
    )
    jsonl = "".join(f'{{"path": "{image_folder}/{p}", "label": "{label}", "split": "{s}"}}\n' for p, label, s in rows)
    jsonl_index = manifest_index(image_folder, "index.jsonl", jsonl)
    assert csv_index.classes == jsonl_index.classes == ["c0", "c1", "c2"]
    assert csv_index.train == jsonl_index.train and len(csv_index.val) == 9


@pytest.mark.parametrize(
    "body, expected",
    [
        ("file,label\nclass_0/000.png,a\n", "lacks column(s) path"),
        ("path,label\nclass_0/000.png,a\nclass_0/999.png,b\n", "line 3: image 'class_0/999.png' does not exist"),
        ("path,label\nclass_0/000.png,a\nclass_1/000.png,\n", "line 3: empty label"),
        ("path,label,split\nclass_0/000.png,a,test\n", "split 'test' is neither train nor val"),
    ],
    ids=["missing-column", "missing-image", "empty-label", "unknown-split"],
)
def test_bad_manifests_name_the_line(image_folder, body, expected):
    with pytest.raises(DataError, match="dataset.manifest") as error:
        manifest_index(image_folder, "index.csv", body)
    assert expected in str(error.value)


def test_manifest_that_is_not_json_names_the_line(image_folder):
    with pytest.raises(DataError, match="line 2 of .* is not JSON"):
        manifest_index(image_folder, "index.jsonl", '{"path": "class_0/000.png", "label": "a"}\n{oops\n')
