"""Cutting a model after its first d blocks into a prefix and the rest, sharing the model's layers.

So that frozen-prefix activations can be computed once and cached (tlray.training.prefix_cache), and
run without autograd while the rest trains. Where to cut is its family's anatomy (tlray.models.families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tlray.archs import ModelError, resolve_freeze_depth
from tlray.models.layout import anatomy_of, unwrap


@dataclass(frozen=True)
class Split:
    """A model cut after its first `depth` blocks: `rest(prefix(x))` is `model(x)`.

    Both run the model's own layers (no copies), so they follow its train/eval mode and
    freezing. `prefix` is nn.Identity() at depth 0; at the full depth it also runs the
    pooling (and flatten) before the head side, or ViT's final LayerNorm and class-token
    selection, so its output is one feature vector per image.
    `rest` may change its input in place when training (EfficientNet's classifier starts
    with Dropout(inplace=True)): give it a copy of cached activations.
    """

    prefix: nn.Module
    rest: nn.Module


def split(model: nn.Module, arch: str, depth: int | str) -> Split:
    """Split the bare `model` of `arch` after `depth` blocks (0..number of blocks, or "all")."""
    if model is not unwrap(model):
        raise ModelError("split() needs the bare model, not a DistributedDataParallel/DataParallel wrapper")
    depth = resolve_freeze_depth(arch, depth)
    anatomy = anatomy_of(model, arch)
    blocks, neck, head = [block.module for block in anatomy.blocks], anatomy.neck, anatomy.head_side
    if depth == 0:
        return Split(nn.Identity(), nn.Sequential(*blocks, *neck, *head))
    if depth == len(blocks):
        return Split(nn.Sequential(*blocks, *neck), nn.Sequential(*head))
    return Split(nn.Sequential(*blocks[:depth]), nn.Sequential(*blocks[depth:], *neck, *head))


def prefix_output_shape(prefix: Split | nn.Module, crop_size: int) -> tuple[int, ...]:
    """The shape of one image's prefix output (no batch dimension), from a zero image run
    in eval mode without gradients; the modules' train/eval flags are restored after."""
    if isinstance(prefix, Split):
        prefix = prefix.prefix
    param = next(prefix.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    modes = {m: m.training for m in prefix.modules()}
    try:
        prefix.eval()
        with torch.no_grad():
            out = prefix(torch.zeros(1, 3, crop_size, crop_size, device=device, dtype=dtype))
    finally:
        for m, training in modes.items():
            m.training = training
    return tuple(out.shape[1:])
