"""tlray.plan.preprocessing: the weights' presets, the spec's image size, ViT's one size."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from tlray import archs
from tlray.archs import ModelError
from tlray.models.layout import ParametersOnMeta
from tlray.plan import preprocessing


def test_preprocessing_from_torchvision_metadata():
    from PIL import Image

    p = preprocessing("resnet18", None)
    assert (p.crop_size, p.resize_size, p.interpolation) == (224, 256, "bilinear")
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and p.std == pytest.approx((0.229, 0.224, 0.225))
    assert preprocessing("efficientnet_b0", None).interpolation == "bicubic"

    small = preprocessing("resnet18", 32)
    assert (small.crop_size, small.resize_size) == (32, round(256 * 32 / 224))
    assert json.loads(json.dumps(small.to_dict())) == small.to_dict()

    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy(), "RGB")
    out = small.eval_transform()(image)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    shipped = small.uint8_transform(False)(image)
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 32, 32)
    # the uint8 path (decode in Ray Data, normalise on the device) gives the reference's pixels
    torch.testing.assert_close(small.normalise(shipped[None])[0], out, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    augmented = small.uint8_transform(True)(image)
    assert augmented.shape == (3, 32, 32) and not torch.equal(augmented, shipped)
    with pytest.raises(ModelError, match="image_size"):
        preprocessing("resnet18", 0)


def test_preprocessing_follows_the_chosen_weights():
    v1, v2 = (
        preprocessing("resnet50", None, "IMAGENET1K_V1"),
        preprocessing("resnet50", None, "IMAGENET1K_V2"),
    )
    assert (v1.resize_size, v1.crop_size, v1.interpolation) == (256, 224, "bilinear")
    assert (v2.resize_size, v2.crop_size, v2.interpolation) == (232, 224, "bilinear")
    assert (
        preprocessing("resnet50", None, "DEFAULT")
        == v2
        == preprocessing("resnet50", None, "ResNet50_Weights.IMAGENET1K_V2")
    )
    assert preprocessing("resnet50", 112, "IMAGENET1K_V1").resize_size == 128  # 256 scaled by 112/224
    assert preprocessing("resnet50", 112, "IMAGENET1K_V2").resize_size == 116
    swag = preprocessing("regnet_y_16gf", None, "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.resize_size, swag.crop_size, swag.interpolation) == (384, 384, "bicubic")
    # a checkpoint, or random init: the DEFAULT preset
    assert preprocessing("resnet50", None, "/models/resnet50.pt") == v2 == preprocessing("resnet50", None)


def test_vit_preprocessing_is_the_size_its_model_is_built_for():
    swag = preprocessing("vit_b_16", None, "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.resize_size, swag.crop_size, swag.interpolation) == (384, 384, "bicubic")
    # vit_h_14's DEFAULT preset is 518 px, but without torchvision weights the model is built for 224
    assert preprocessing("vit_h_14", None, "DEFAULT").crop_size == 518
    for weights in (None, "/models/vit_h_14.pt"):
        p = preprocessing("vit_h_14", None, weights)
        assert (p.crop_size, p.resize_size, p.interpolation) == (224, 224, "bicubic")
    with pytest.raises(ModelError, match=r"^dataset.image_size: vit_b_32 .* 224 px"):
        preprocessing("vit_b_32", 64, "DEFAULT")
    with pytest.raises(ModelError, match=r"^dataset.image_size: convnext_tiny needs .* at least 32 px"):
        preprocessing("convnext_tiny", 16)


@pytest.mark.parametrize("arch", [a for a, arch in archs.ARCHS.items() if arch.family == "vit"])
def test_vit_sizes_match_torchvision(arch):
    """tlray.archs's table of ViT sizes (read without torch) against torchvision's weights and builder."""
    enum = torchvision.models.get_model_weights(arch)
    for name in enum.__members__:  # DEFAULT included
        member = enum[name]
        assert archs.fixed_input_size(arch, name) == member.meta["min_size"][0] == member.transforms().crop_size[0]
    with ParametersOnMeta():
        built = torchvision.models.get_model(arch, weights=None)
    assert archs.fixed_input_size(arch, None) == archs.fixed_input_size(arch, "/a/checkpoint.pt") == built.image_size
