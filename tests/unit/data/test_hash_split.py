"""The stable train/val split: a function of the key and the seed alone."""

from __future__ import annotations

from pathlib import Path

from tlray.data.index import DatasetIndex, build_index
from tlray.data.split import in_val_split
from tlray.spec import DatasetSpec

from conftest import write_image_folder


def index_of(root: Path, **options) -> DatasetIndex:
    return build_index(DatasetSpec(uri=str(root), **options))


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
