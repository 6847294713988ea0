"""The supported torchvision architectures as plain data: family, backbone blocks, weights names.

`tlray validate`, `render` and the spec's rules need an arch's block names (to check freeze_depth)
and weights names (to tell a torchvision weights name from a checkpoint path). Reading them off
torchvision means importing torch: seconds and a gigabyte, more than the 0.5 GiB pod that runs
`tlray launch`. So they are written down here, and tests/unit/flows/test_light_cli.py checks this table
against the models torchvision builds (on the meta device, as tlray.models.layout does).

A family's name here is also the name of its module in tlray/models/families/, which says where
its models' blocks and head are: a new family is its rows in ARCHS plus that one module.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass

from tlray.errors import UserError


class ModelError(UserError, ValueError):
    """Bad model settings. The message starts with the spec key it concerns ("model.arch: ...").

    A ValueError so pydantic validators turn it into a validation error; a UserError so
    the CLI reports it without a traceback.
    """


@dataclass(frozen=True)
class Arch:
    family: str
    blocks: tuple[str, ...]  # backbone blocks, input to output: what freeze_depth counts
    weights_enum: str  # torchvision's weights enum, e.g. "ResNet50_Weights"
    weights: tuple[str, ...]  # its members, without the DEFAULT alias


def _features(count: int) -> tuple[str, ...]:
    """EfficientNet, MobileNet, ConvNeXt: one block per child of `model.features`."""
    return tuple(f"features.{i}" for i in range(count))


def _vit(layers: int) -> tuple[str, ...]:
    """ViT: the patch embedding (with class token and position embedding), then each encoder layer."""
    return ("stem", *(f"encoder_layer_{i}" for i in range(layers)))


RESNET = ("stem", "layer1", "layer2", "layer3", "layer4")
REGNET = ("stem", "block1", "block2", "block3", "block4")
V1, V2 = ("IMAGENET1K_V1",), ("IMAGENET1K_V1", "IMAGENET1K_V2")
SWAG = ("IMAGENET1K_SWAG_E2E_V1", "IMAGENET1K_SWAG_LINEAR_V1")

ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet", RESNET, "ResNet18_Weights", V1),
    "resnet34": Arch("resnet", RESNET, "ResNet34_Weights", V1),
    "resnet50": Arch("resnet", RESNET, "ResNet50_Weights", V2),
    "resnet101": Arch("resnet", RESNET, "ResNet101_Weights", V2),
    "resnet152": Arch("resnet", RESNET, "ResNet152_Weights", V2),
    "resnext50_32x4d": Arch("resnet", RESNET, "ResNeXt50_32X4D_Weights", V2),
    "resnext101_32x8d": Arch("resnet", RESNET, "ResNeXt101_32X8D_Weights", V2),
    "resnext101_64x4d": Arch("resnet", RESNET, "ResNeXt101_64X4D_Weights", V1),
    "wide_resnet50_2": Arch("resnet", RESNET, "Wide_ResNet50_2_Weights", V2),
    "wide_resnet101_2": Arch("resnet", RESNET, "Wide_ResNet101_2_Weights", V2),
    "efficientnet_b0": Arch("efficientnet", _features(9), "EfficientNet_B0_Weights", V1),
    "efficientnet_b1": Arch("efficientnet", _features(9), "EfficientNet_B1_Weights", V2),
    "efficientnet_b2": Arch("efficientnet", _features(9), "EfficientNet_B2_Weights", V1),
    "efficientnet_b3": Arch("efficientnet", _features(9), "EfficientNet_B3_Weights", V1),
    "efficientnet_b4": Arch("efficientnet", _features(9), "EfficientNet_B4_Weights", V1),
    "efficientnet_b5": Arch("efficientnet", _features(9), "EfficientNet_B5_Weights", V1),
    "efficientnet_b6": Arch("efficientnet", _features(9), "EfficientNet_B6_Weights", V1),
    "efficientnet_b7": Arch("efficientnet", _features(9), "EfficientNet_B7_Weights", V1),
    "efficientnet_v2_s": Arch("efficientnet", _features(8), "EfficientNet_V2_S_Weights", V1),
    "efficientnet_v2_m": Arch("efficientnet", _features(9), "EfficientNet_V2_M_Weights", V1),
    "efficientnet_v2_l": Arch("efficientnet", _features(9), "EfficientNet_V2_L_Weights", V1),
    "mobilenet_v2": Arch("mobilenet", _features(19), "MobileNet_V2_Weights", V2),
    "mobilenet_v3_small": Arch("mobilenet", _features(13), "MobileNet_V3_Small_Weights", V1),
    "mobilenet_v3_large": Arch("mobilenet", _features(17), "MobileNet_V3_Large_Weights", V2),
    "convnext_tiny": Arch("convnext", _features(8), "ConvNeXt_Tiny_Weights", V1),
    "convnext_small": Arch("convnext", _features(8), "ConvNeXt_Small_Weights", V1),
    "convnext_base": Arch("convnext", _features(8), "ConvNeXt_Base_Weights", V1),
    "convnext_large": Arch("convnext", _features(8), "ConvNeXt_Large_Weights", V1),
    "regnet_x_400mf": Arch("regnet", REGNET, "RegNet_X_400MF_Weights", V2),
    "regnet_x_800mf": Arch("regnet", REGNET, "RegNet_X_800MF_Weights", V2),
    "regnet_x_1_6gf": Arch("regnet", REGNET, "RegNet_X_1_6GF_Weights", V2),
    "regnet_x_3_2gf": Arch("regnet", REGNET, "RegNet_X_3_2GF_Weights", V2),
    "regnet_x_8gf": Arch("regnet", REGNET, "RegNet_X_8GF_Weights", V2),
    "regnet_x_16gf": Arch("regnet", REGNET, "RegNet_X_16GF_Weights", V2),
    "regnet_x_32gf": Arch("regnet", REGNET, "RegNet_X_32GF_Weights", V2),
    "regnet_y_400mf": Arch("regnet", REGNET, "RegNet_Y_400MF_Weights", V2),
    "regnet_y_800mf": Arch("regnet", REGNET, "RegNet_Y_800MF_Weights", V2),
    "regnet_y_1_6gf": Arch("regnet", REGNET, "RegNet_Y_1_6GF_Weights", V2),
    "regnet_y_3_2gf": Arch("regnet", REGNET, "RegNet_Y_3_2GF_Weights", V2),
    "regnet_y_8gf": Arch("regnet", REGNET, "RegNet_Y_8GF_Weights", V2),
    "regnet_y_16gf": Arch("regnet", REGNET, "RegNet_Y_16GF_Weights", V2 + SWAG),
    "regnet_y_32gf": Arch("regnet", REGNET, "RegNet_Y_32GF_Weights", V2 + SWAG),
    "regnet_y_128gf": Arch("regnet", REGNET, "RegNet_Y_128GF_Weights", SWAG),
    "vit_b_16": Arch("vit", _vit(12), "ViT_B_16_Weights", V1 + SWAG),
    "vit_b_32": Arch("vit", _vit(12), "ViT_B_32_Weights", V1),
    "vit_l_16": Arch("vit", _vit(24), "ViT_L_16_Weights", V1 + SWAG),
    "vit_l_32": Arch("vit", _vit(24), "ViT_L_32_Weights", V1),
    "vit_h_14": Arch("vit", _vit(32), "ViT_H_14_Weights", SWAG),
}


def _families() -> dict[str, tuple[str, ...]]:
    families: dict[str, tuple[str, ...]] = {}
    for name, arch in ARCHS.items():
        families[arch.family] = (*families.get(arch.family, ()), name)
    return families


SUPPORTED_FAMILIES = _families()  # family -> its archs, in the order above


def supported_archs() -> list[str]:
    return list(ARCHS)


def arch_of(arch: str) -> Arch:
    if arch in ARCHS:
        return ARCHS[arch]
    close = difflib.get_close_matches(str(arch), supported_archs(), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"supported: {', '.join(supported_archs())}"
    raise ModelError(f"model.arch: unknown arch '{arch}'; {hint}")


def family_of(arch: str) -> str:
    return arch_of(arch).family


def backbone_block_names(arch: str) -> list[str]:
    return list(arch_of(arch).blocks)


def block_lr_factor(arch: str, block: int, decay: float) -> float:
    """train.layer_lr_decay's factor of the learning rate of backbone block `block` (0-based): `decay`**i, i its
    distance in blocks from the head (the last block: i = 1)."""
    return decay ** (len(arch_of(arch).blocks) - block)


def weights_names(arch: str) -> list[str]:
    """The names torchvision accepts for `arch`'s pretrained weights, DEFAULT first."""
    return ["DEFAULT", *arch_of(arch).weights]


def torchvision_weights_name(arch: str, name: str) -> str | None:
    """The weights member that `name` means ("DEFAULT", "IMAGENET1K_V2", "ResNet18_Weights.DEFAULT"), else None:
    then `name` is a checkpoint, as `tlray.models.build.build_model` decides."""
    member = name.removeprefix(arch_of(arch).weights_enum + ".")
    return member if member in weights_names(arch) else None


# ---------------------------------------------------------------- input sizes

# ViT adds a position embedding of one length to its patches, so a model runs at one image size: torchvision
# builds it at its weights' size (their meta["min_size"], also their transforms' crop) and at 224 without
# torchvision weights (random init, or a checkpoint loaded into that build).
VIT_BUILT_SIZE = 224
VIT_WEIGHTS_SIZES: dict[str, dict[str, int]] = {
    "vit_b_16": {"DEFAULT": 224, "IMAGENET1K_V1": 224, "IMAGENET1K_SWAG_E2E_V1": 384, "IMAGENET1K_SWAG_LINEAR_V1": 224},
    "vit_b_32": {"DEFAULT": 224, "IMAGENET1K_V1": 224},
    "vit_l_16": {"DEFAULT": 224, "IMAGENET1K_V1": 224, "IMAGENET1K_SWAG_E2E_V1": 512, "IMAGENET1K_SWAG_LINEAR_V1": 224},
    "vit_l_32": {"DEFAULT": 224, "IMAGENET1K_V1": 224},
    "vit_h_14": {"DEFAULT": 518, "IMAGENET1K_SWAG_E2E_V1": 518, "IMAGENET1K_SWAG_LINEAR_V1": 224},
}
# ConvNeXt downsamples by 4 and then three times by 2 with unpadded convolutions: below 32 px a stage gets 0 px.
MIN_INPUT_SIZE = {"convnext": 32}


def fixed_input_size(arch: str, weights: str | None) -> int | None:
    """The one image size `arch` runs at when built from `weights` (a weights name, a checkpoint or None),
    or None when its convolutions take any size (from `min_input_size`)."""
    if family_of(arch) != "vit":
        return None
    member = torchvision_weights_name(arch, weights) if weights else None
    return VIT_WEIGHTS_SIZES[arch][member] if member else VIT_BUILT_SIZE


def min_input_size(arch: str) -> int:
    return MIN_INPUT_SIZE.get(family_of(arch), 1)


def image_size_problem(arch: str, weights: str | None, image_size: int) -> str | None:
    """Why `arch` built from `weights` cannot run on `image_size` px images (None when it can)."""
    fixed = fixed_input_size(arch, weights)
    if fixed is not None and image_size != fixed:
        built = (
            f"with weights {weights}"
            if torchvision_weights_name(arch, weights or "")
            else "without torchvision weights"
        )
        return (
            f"{arch} {built} is built for {fixed} px images (its position embedding has one length); "
            f"set {fixed} or leave dataset.image_size out"
        )
    if image_size < min_input_size(arch):
        return f"{arch} needs images of at least {min_input_size(arch)} px (got {image_size})"
    return None


def resolve_freeze_depth(arch: str, depth: int | str) -> int:
    names = backbone_block_names(arch)
    total = len(names)
    valid = f"valid: 0..{total} or 'all' (blocks of {arch}: {', '.join(names)})"
    if isinstance(depth, str):
        if depth == "all":
            return total
        if not depth.strip().isdigit():  # "3" from a command line is fine, "most" is not
            raise ModelError(f"model.freeze_depth: '{depth}' is not a depth; {valid}")
        depth = int(depth)
    if isinstance(depth, bool):
        raise ModelError(f"model.freeze_depth: {depth} is not a depth; {valid}")
    try:
        value = operator.index(depth)  # ints and numpy ints (Tune samples), not floats
    except TypeError:
        raise ModelError(f"model.freeze_depth: {depth!r} is not a whole number; {valid}") from None
    if not 0 <= value <= total:
        raise ModelError(f"model.freeze_depth: {value} is out of range; {valid}")
    return value
