"""How an image becomes the model's input: resize, crop, scale, normalise.

The data pipeline applies the geometry in its CPU tasks and ships uint8; the training device (or an
inference actor) normalises. The numbers come from the pretrained weights' preset, which the layers
above read from torchvision; this class only holds them (published in metadata.json) and applies them.
Importing it loads no torch: the index and the light commands use tlray.data without it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    resize_size: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision InterpolationMode value, e.g. "bilinear"

    def _geometry(self, augment: bool) -> list:
        """Resize and crop (random with `augment`): the part that runs in Ray Data's CPU tasks."""
        from torchvision.transforms import v2

        mode = v2.InterpolationMode(self.interpolation)
        if augment:
            return [v2.RandomResizedCrop(self.crop_size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
        return [v2.Resize(self.resize_size, interpolation=mode, antialias=True), v2.CenterCrop(self.crop_size)]

    def uint8_transform(self, augment: bool = False):
        """PIL image -> uint8 tensor C x crop x crop. Shipped as uint8 (a quarter of float32's bytes);
        `normalise` finishes it on the training device. Deterministic without `augment`."""
        from torchvision.transforms import v2

        return v2.Compose(self._geometry(augment) + [v2.PILToTensor()])

    def normalise(self, images):
        """uint8 N x C x H x W torch tensor (on any device) -> the float32 input the model expects."""
        import torch

        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def eval_transform(self):
        """PIL image -> normalised float tensor C x crop x crop, in one process (the reference path)."""
        import torch
        from torchvision.transforms import v2

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
