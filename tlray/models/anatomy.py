"""The words every architecture family describes its models in: blocks, neck, head side, head.

A family module (tlray/models/families/) answers one question, `anatomy(model)`, and everything
else is read off that one answer: the block map freeze_depth counts (tlray.models.layout), the
head build_model replaces (tlray.models.build) and the prefix/rest cut (tlray.models.split). The
block names and the modules that run them come from the same list, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """One backbone block: what freeze_depth counts, input to output."""

    name: str  # as the user reads it in freeze_depth's messages, e.g. "layer1"
    paths: tuple[str, ...]  # the dotted paths (modules or bare parameters) it covers: what freezing it freezes
    module: nn.Module  # what runs it in torchvision's forward (the model's own layers, not copies)


@dataclass(frozen=True)
class Anatomy:
    """torchvision's forward of one model as (blocks, neck, head side): running all three in order is model(x).

    The neck is what the frozen prefix adds after the last block when the whole backbone is frozen, so that
    a feature extractor's prefix output (what the cache stores) is what the head reads: the pooled features,
    or ViT's class token after the final LayerNorm (768 numbers an image for ViT-B, not 197 tokens of 768).
    """

    blocks: tuple[Block, ...]
    neck: tuple[nn.Module, ...]
    head_side: tuple[nn.Module, ...]
    head: str  # path of the final Linear that build_model replaces


class Op(nn.Module):
    """`fn(x, **parts)`: a piece of a torchvision forward written as a function. The parts (the
    model's own modules and parameters, or plain values) are registered by reference, not copied."""

    def __init__(self, fn, **parts):
        super().__init__()
        self.fn = fn  # module-level, so copy.deepcopy and pickle keep working
        self.part_names = tuple(parts)
        for name, part in parts.items():
            setattr(self, name, part)  # nn.Module registers modules and Parameters, keeps the rest as attributes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **{name: getattr(self, name) for name in self.part_names})

    def extra_repr(self) -> str:
        return self.fn.__name__


def feature_blocks(model: nn.Module) -> tuple[Block, ...]:
    """EfficientNet, MobileNet, ConvNeXt: one block per child of `model.features`."""
    return tuple(Block(f"features.{i}", (f"features.{i}",), block) for i, block in enumerate(model.features))


def classifier_head(model: nn.Module) -> str:
    """The last Linear of `model.classifier`: only it is replaced; the layers before it stay, trainable."""
    # EfficientNet (Dropout, Linear), MobileNet v2 (Dropout, Linear), MobileNet v3
    # (Linear, Hardswish, Dropout, Linear), ConvNeXt (LayerNorm2d, Flatten, Linear).
    last = max(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    return f"classifier.{last}"
