"""tlray.models.build: checkpoints (written to tmp_path) and bad weights values."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tlray.archs import ModelError
from tlray.models.build import build_model
from tlray.models.layout import head_module

from model_cases import EXPECTED, NUM_CLASSES, ONE_PER_FAMILY


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_build_from_checkpoint(arch, tmp_path):
    _, head, _ = EXPECTED[arch]
    torch.manual_seed(1)
    source = torchvision.models.get_model(arch, weights=None)  # 1000-class ImageNet head
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    del source

    model = build_model(arch, str(path), NUM_CLASSES)
    assert head_module(model, arch).out_features == NUM_CLASSES
    loaded = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k not in head_keys)
    assert loaded[f"{head}.weight"].shape[0] == NUM_CLASSES


def test_build_from_wrapped_checkpoint_with_another_head(tmp_path):
    """A tlray/DDP-style checkpoint: {"model": {"module.<key>": ...}} with a 5-class head."""
    source = build_model("resnet18", None, 5)
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "c.pt")
    model = build_model("resnet18", str(tmp_path / "c.pt"), 2)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 2
    torch.save({"state_dict": source.state_dict()}, tmp_path / "s.pt")
    assert torch.equal(build_model("resnet18", str(tmp_path / "s.pt"), 2).conv1.weight, source.conv1.weight)


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"^model\.weights: .*(missing|unexpected) keys") as err:
        build_model("resnet18", str(tmp_path / "m.pt"), NUM_CLASSES)
    assert "conv1.weight" in str(err.value)


def test_bad_weights_values(tmp_path):
    with pytest.raises(ModelError, match=r"^model\.weights: 'nope\.pt' is neither .*IMAGENET1K_V1"):
        build_model("resnet18", "nope.pt", NUM_CLASSES)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match=r"^model\.weights: cannot read"):
        build_model("resnet18", str(tmp_path / "junk.pt"), NUM_CLASSES)
    with pytest.raises(ModelError, match=r"^model\.num_classes"):
        build_model("resnet18", None, 0)
