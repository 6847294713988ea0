"""The data layouts: the manifest layout's CSV/JSONL index and its errors; each spec layout's module and reader."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from tlray.data import layouts, readers
from tlray.data.errors import DataError
from tlray.data.index import DatasetIndex, build_index
from tlray.spec import DataLayout, DatasetSpec


def index_of(root: Path, **options) -> DatasetIndex:
    return build_index(DatasetSpec(uri=str(root), **options))


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


@pytest.mark.parametrize("name", typing.get_args(DataLayout))
def test_every_spec_layout_has_a_module_that_names_a_reader(name):
    layout = layouts.layout(name)
    assert callable(layout.rows) and callable(layout.is_data_file) and callable(layout.label_source)
    assert callable(readers.reader(layout.READER).read)
    assert set(layouts.LAYOUTS) == set(typing.get_args(DataLayout))
