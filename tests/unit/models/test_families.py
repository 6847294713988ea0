"""tlray.models.layout and the families: block maps read off torchvision's models, arch names."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from tlray.archs import SUPPORTED_FAMILIES, ModelError, family_of, resolve_freeze_depth, supported_archs
from tlray.models.build import weights_enum
from tlray.models.layout import ParametersOnMeta, backbone_block_names, head_module, layout_of

from model_cases import EXPECTED, fresh

HEAD_SIDE = {
    "resnet": ["fc"],
    "efficientnet": ["classifier"],
    "mobilenet": ["classifier"],
    "convnext": ["classifier"],
    "regnet": ["fc"],
    "vit": ["encoder.ln", "heads"],
}


# ---------------------------------------------------------------- block maps


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_block_map_matches_the_hand_written_one(arch):
    blocks, head, _ = EXPECTED[arch]
    assert len(backbone_block_names(arch)) == len(blocks)
    assert resolve_freeze_depth(arch, "all") == len(blocks)
    model = fresh(arch)
    assert head_module(model, arch) is model.get_submodule(head)


def test_block_names_are_readable():
    assert backbone_block_names("resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert backbone_block_names("convnext_tiny")[3] == "features.3"
    assert backbone_block_names("vit_b_32")[6] == "encoder_layer_5"
    assert backbone_block_names("regnet_x_400mf") == ["stem", "block1", "block2", "block3", "block4"]


@pytest.mark.parametrize("arch", supported_archs())
def test_every_supported_arch_blocks_cover_the_backbone(arch):
    """On the meta device (no memory): blocks are disjoint, and every parameter outside them is head-side."""
    with ParametersOnMeta():  # plain torch.device("meta") cannot build RegNet
        model = torchvision.models.get_model(arch, weights=None)
    layout = layout_of(arch)
    owner: dict[str, str] = {}
    names = dict(model.named_parameters())
    for block, paths in layout.blocks:
        for path in paths:
            prefix = path + "."
            hits = [n for n in names if n == path or n.startswith(prefix)]
            assert hits, f"{arch}: {path} holds no parameters"
            for n in hits:
                assert n not in owner, f"{arch}: {n} is in {owner.get(n)} and {block}"
                owner[n] = block
    head_side = HEAD_SIDE[family_of(arch)]
    rest = [n for n in names if n not in owner]
    assert rest and all(any(n == h or n.startswith(h + ".") for h in head_side) for n in rest), rest
    assert isinstance(model.get_submodule(layout.head), nn.Linear)


def test_supported_families_and_errors():
    assert set(SUPPORTED_FAMILIES) == {"resnet", "efficientnet", "mobilenet", "convnext", "regnet", "vit"}
    assert family_of("resnext50_32x4d") == "resnet"
    assert family_of("efficientnet_v2_l") == "efficientnet"
    with pytest.raises(ModelError, match=r"^model\.arch: unknown arch 'resnet19'; did you mean 'resnet18'\?"):
        family_of("resnet19")
    with pytest.raises(ModelError, match="model.arch"):
        backbone_block_names("alexnet")
    assert weights_enum("resnet18") is torchvision.models.ResNet18_Weights


@pytest.mark.parametrize("bad", [-1, 6, 2.5, "most", "", True, None])
def test_resolve_freeze_depth_errors(bad):
    with pytest.raises(ModelError, match=r"^model\.freeze_depth: .*0\.\.5.*layer4") as err:
        resolve_freeze_depth("resnet18", bad)
    assert isinstance(err.value, ValueError)


def test_resolve_freeze_depth_values():
    import numpy as np

    assert resolve_freeze_depth("resnet18", 0) == 0
    assert resolve_freeze_depth("resnet18", 5) == 5
    assert resolve_freeze_depth("resnet18", "all") == 5
    assert resolve_freeze_depth("resnet18", np.int64(3)) == 3  # as Tune samples it
    assert resolve_freeze_depth("vit_b_32", "all") == 13
