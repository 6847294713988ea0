"""Where things are in a model of one arch: its backbone blocks and its head, as dotted paths.

A model is an ordered list of named backbone *blocks*, input to output, followed by head-side layers
(the classifier, ViT's final LayerNorm, ...). `freeze_depth = d` freezes the first d blocks: 0 is a full
fine-tune, "all" (the number of blocks) a feature extractor. The block map is read off a model built on
the meta device, so it costs no memory and always matches what torchvision builds; its family's module
(tlray.models.families) says where the blocks are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from tlray.archs import family_of
from tlray.models.anatomy import Anatomy
from tlray.models.families import family_module


def anatomy_of(model: nn.Module, arch: str) -> Anatomy:
    """The blocks, neck, head side and head of the bare `model` of `arch`, as its family describes them."""
    return family_module(family_of(arch)).anatomy(model)


@dataclass(frozen=True)
class Layout:
    """An arch's block map without a model: what the blocks are called and which paths each covers."""

    blocks: tuple[tuple[str, tuple[str, ...]], ...]  # (block name, paths it covers), input -> output
    head: str  # path of the final Linear that build_model replaces


class ParametersOnMeta(TorchFunctionMode):
    """Within it, `torch.empty` without a device allocates on the meta device.

    Torch layers create their parameters with torch.empty, so models build without
    memory or init cost (even vit_h_14). Plain `with torch.device("meta")` is not enough:
    RegNet computes its stage widths with tensor arithmetic and reads them back with
    .tolist(), which meta tensors cannot do. Torch function modes are per thread.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@functools.cache
def layout_of(arch: str) -> Layout:
    family_of(arch)  # a clear error for unsupported archs before torchvision's own
    with ParametersOnMeta():  # shapes only: the block map needs no real weights
        model = torchvision.models.get_model(arch, weights=None)
    anatomy = anatomy_of(model, arch)
    return Layout(tuple((block.name, block.paths) for block in anatomy.blocks), anatomy.head)


def backbone_block_names(arch: str) -> list[str]:
    """Read off the model torchvision builds; tlray.archs has the same names without torch."""
    return [name for name, _ in layout_of(arch).blocks]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel/DataParallel wrapper (`model` itself if none)."""
    is_wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    return model.module if is_wrapped else model


def head_module(model: nn.Module, arch: str) -> nn.Module:
    return unwrap(model).get_submodule(layout_of(arch).head)
