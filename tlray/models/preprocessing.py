"""An arch's image preprocessing, read off the torchvision weights the model starts from.

The images must be resized, cropped and normalised as the weights were trained (resnet50's V1 and
V2 weights resize differently), so the preset is the weights' own transforms, resized to the spec's
image size where it sets one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from tlray.models import archs
from tlray.models.archs import ModelError
from tlray.models.build import torchvision_weights, weights_enum


@dataclass(frozen=True)
class Preprocessing:
    resize_size: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision InterpolationMode value, e.g. "bilinear"

    def _geometry(self, augment: bool) -> list:
        """Resize and crop (random with `augment`): the part that runs in Ray Data's CPU tasks."""
        mode = v2.InterpolationMode(self.interpolation)
        if augment:
            return [v2.RandomResizedCrop(self.crop_size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
        return [v2.Resize(self.resize_size, interpolation=mode, antialias=True), v2.CenterCrop(self.crop_size)]

    def uint8_transform(self, augment: bool = False):
        """PIL image -> uint8 tensor C x crop x crop. Shipped as uint8 (a quarter of float32's bytes);
        `normalise` finishes it on the training device. Deterministic without `augment`."""
        return v2.Compose(self._geometry(augment) + [v2.PILToTensor()])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (on any device) -> the float32 input the model expects."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def eval_transform(self):
        """PIL image -> normalised float tensor C x crop x crop, in one process (the reference path)."""
        return v2.Compose(
            self._geometry(False)
            + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        )

    def to_dict(self) -> dict:
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def preprocessing(arch: str, image_size: int | None, weights: str | None = None) -> Preprocessing:
    """The preset of the weights the model starts from (reading it downloads nothing): resnet50's IMAGENET1K_V1
    resizes to 256, its V2 to 232; SWAG weights crop 384 or more, bicubic. `weights` is the spec's name for them
    ("IMAGENET1K_V2", "ResNet50_Weights.DEFAULT"); for a checkpoint or None (random init) the DEFAULT preset.

    image_size replaces the crop size and scales the resize size by the same ratio. Left out, a ViT without
    torchvision weights takes the size it is built for, not DEFAULT's (vit_h_14's DEFAULT is 518 px).
    """
    member = torchvision_weights(arch, weights) if weights else None
    preset = (member or weights_enum(arch).DEFAULT).transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ModelError(f"dataset.image_size: need a positive number of pixels, got {image_size!r}")
        problem = archs.image_size_problem(arch, weights, image_size)
        if problem:
            raise ModelError(f"dataset.image_size: {problem}")
    size = image_size or archs.fixed_input_size(arch, weights) or crop
    crop, resize = size, round(resize * size / crop)
    return Preprocessing(
        resize_size=resize,
        crop_size=crop,
        mean=tuple(float(x) for x in preset.mean),
        std=tuple(float(x) for x in preset.std),
        interpolation=preset.interpolation.value,
    )
