"""The demo's image folders: halves, few-shot splits and drift, at the real size (all 1,797 scans)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tlray.data import demo_data
from tlray.errors import UserError


@pytest.fixture(scope="module")
def scans():
    return demo_data.load_scans()


def test_the_halves_split_every_digit_and_never_overlap(scans):
    _, labels = scans
    a, b = demo_data.scan_halves(labels)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == len(labels)
    for digit in range(10):
        count = int((labels == digit).sum())
        assert int((labels[a] == digit).sum()) == count // 2
    again, _ = demo_data.scan_halves(labels)
    assert np.array_equal(a, again)  # the sources never change with --seed


def test_few_shot_keeps_k_per_class_for_training_and_the_rest_for_validation(scans):
    _, labels = scans
    split = demo_data.few_shot(labels, 7, np.random.default_rng(3))
    assert np.bincount(labels[split["train"]]).tolist() == [7] * 10
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert len(split["train"]) + len(split["val"]) == len(labels)
    other = demo_data.few_shot(labels, 7, np.random.default_rng(4))
    assert not np.array_equal(split["train"], other["train"])  # another seed labels other images


@pytest.mark.parametrize("k", [0, 174])
def test_k_must_leave_validation_images(scans, k):
    _, labels = scans  # the rarest digit has 174 scans
    with pytest.raises(UserError, match=r"--k: must be 1\.\.173"):
        demo_data.few_shot(labels, k, np.random.default_rng(0))


def test_drift_changes_every_scan_and_follows_the_seed(scans):
    images, _ = scans
    first = demo_data.drift(images[:50], np.random.default_rng(1))
    assert first.shape == (50, demo_data.DRIFT_SIZE, demo_data.DRIFT_SIZE) and first.dtype == np.uint8
    assert np.array_equal(first, demo_data.drift(images[:50], np.random.default_rng(1)))
    assert not np.array_equal(first, demo_data.drift(images[:50], np.random.default_rng(2)))
    upsampled = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BILINEAR)) for s in images[:50]])
    background = upsampled < 16
    assert first[background].mean() > 40  # a textured, noisy background where the scans are black


def test_the_folders_hold_what_the_specs_read(tmp_path, scans):
    _, labels = scans
    folders = demo_data.write_demo_folders(tmp_path, k=4, seed=0)
    assert len(list(folders.digits.glob("*/*.png"))) == len(labels)
    assert sorted(p.name for p in folders.source_0_4.iterdir() if not p.name.startswith(".")) == list("01234")
    assert len(list(folders.source_0_4.glob("*/*.png"))) == int((labels < 5).sum())
    assert len(list(folders.source_10.glob("*/*.png"))) == len(demo_data.scan_halves(labels)[0])
    held_out = len(demo_data.scan_halves(labels)[1])
    for folder, classes, scans_in_target in (
        (folders.new_domain, 10, held_out),
        (folders.new_classes, 5, (labels >= 5).sum()),
    ):
        trained = list(folder.glob("train/*/*.png"))
        assert len(trained) == 4 * classes
        assert len(trained) + len(list(folder.glob("val/*/*.png"))) == scans_in_target
    assert sorted(p.name for p in folders.new_classes.joinpath("train").iterdir()) == list("56789")
    stamp = folders.new_domain / ".written"
    before = stamp.stat().st_mtime_ns
    demo_data.write_demo_folders(tmp_path, k=4, seed=0)
    assert stamp.stat().st_mtime_ns == before  # written once per (k, seed)
    demo_data.write_demo_folders(tmp_path, k=3, seed=0)
    assert len(list(folders.new_domain.glob("train/*/*.png"))) == 30
