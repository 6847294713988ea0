"""Freezing a model's first blocks, and what the optimizer then gets (its parameter groups).

`freeze` freezes exactly what `split(...).prefix` runs, so that the frozen prefix is a pure function of
the image whose output can be cached. Call it on the bare model, before DDP wrapping.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tlray.archs import ModelError, block_lr_factor, resolve_freeze_depth
from tlray.models.families import vit
from tlray.models.layout import backbone_block_names, layout_of, unwrap
from tlray.models.split import split

log = logging.getLogger("tlray")


@dataclass(frozen=True)
class FreezeSummary:
    depth: int
    total_blocks: int
    frozen_blocks: list[str]
    trainable_params: int  # numel sums
    frozen_params: int


def freeze(
    model: nn.Module, arch: str, depth: int | str, batchnorm: str = "frozen", started_at: int | str | None = None
) -> FreezeSummary:
    """Freeze the first `depth` backbone blocks; the rest and the head stay trainable.

    Everything `split(model, arch, depth).prefix` runs is frozen: the first `depth` blocks, and at the
    full depth the neck after them (pooling; ViT's final LayerNorm). Frozen parameters stop requiring
    gradients. With batchnorm="frozen", every module of the prefix also stays in eval mode through
    model.train(): BatchNorm keeps its running statistics, Dropout and StochasticDepth are off, so the
    frozen prefix is a pure function of the image (its output can be cached). With batchnorm="train", only the BatchNorm
    layers follow model.train()/eval() (their statistics keep updating); Dropout and StochasticDepth
    in frozen blocks stay off.

    Call it on the bare model, before DDP wrapping: DDP records which parameters need
    gradients when it is built, so changing that afterwards breaks its reduction.
    Calling it again re-freezes from scratch at the new depth.

    `started_at`: the depth a gradually unfrozen run started at (train.unfreeze_every). With
    batchnorm="frozen", the BatchNorm layers of the blocks unfrozen since stay in eval mode as
    well: they were frozen blocks, so they keep the statistics they were pretrained with, while
    their scale and shift train with the rest of the block.
    """
    if model is not unwrap(model):
        raise ModelError(
            "model.freeze_depth: freeze() was given a DistributedDataParallel/DataParallel model; "
            "freeze the bare model first, then wrap it (ray.train.torch.prepare_model)"
        )
    if batchnorm not in ("frozen", "train"):
        raise ModelError(f"model.batchnorm: must be 'frozen' or 'train', got {batchnorm!r}")
    depth = resolve_freeze_depth(arch, depth)
    blocks = backbone_block_names(arch)

    for p in model.parameters():  # start from "all trainable" so repeated calls do not accumulate
        p.requires_grad_(True)
    for m in model.modules():  # and from no locked layer, all in the model's mode
        _unlock(m, model.training)

    prefix = split(model, arch, depth).prefix  # the first `depth` blocks (and a feature extractor's neck)
    for p in prefix.parameters():
        p.requires_grad_(False)
    for m in prefix.modules():
        # "train": only BatchNorm follows model.train(); Dropout and StochasticDepth in frozen blocks stay off
        if batchnorm == "frozen" or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            lock_eval(m)
    if batchnorm == "frozen" and started_at is not None:
        for m in split(model, arch, resolve_freeze_depth(arch, started_at)).prefix.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                lock_eval(m)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen_names = blocks[:depth]
    log.info(
        "trainable %d / frozen %d parameters (freeze_depth %d of %d: blocks %s)",
        trainable,
        frozen,
        depth,
        len(blocks),
        ", ".join(frozen_names) or "none",
    )
    return FreezeSummary(depth, len(blocks), frozen_names, trainable, frozen)


def lock_eval(module: nn.Module) -> None:
    """Keep `module` in eval mode whatever model.train() asks (its children follow their own locks)."""
    module.train = functools.partial(_train_locked_in_eval, module)  # instance attribute wins over the class method
    module.train(False)


def _train_locked_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    # Stands in for nn.Module.train on a module of a frozen block: whatever model.train()
    # asks, it stays in eval mode, so BatchNorm normalises with its running statistics and
    # never updates them, and Dropout and StochasticDepth do nothing. It passes the call on to
    # its children, which are locked too, except BatchNorm layers with `model.batchnorm: train`.
    # Kept as a module-level function behind functools.partial (not a bound method) so that
    # copy.deepcopy and pickle rebind it to the copy.
    module.training = False
    for child in module.children():
        child.train(mode)
    return module


def _unlock(module: nn.Module, training: bool) -> None:
    module.__dict__.pop("train", None)
    module.training = training


# ---------------------------------------------------------------- what the optimizer gets


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: frozen parameters then never receive momentum or weight decay."""
    return [p for p in model.parameters() if p.requires_grad]


# Layers whose parameters rescale or shift activations rather than mix them: decaying them towards 0 only
# fights the normalisation (torchvision's reference scripts list the same classes).
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,  # ConvNeXt's LayerNorm2d too
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def is_decayed(model: nn.Module, name: str) -> bool:
    """Whether weight decay applies to the parameter `name` of the bare `model`: not to norm layers, biases, or
    ViT's position embedding and class token (as timm and torchvision's reference scripts train)."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "bias" or leaf.endswith("_bias"):  # nn.MultiheadAttention's is in_proj_bias
        return False
    if vit.is_embedding(model, name):
        return False
    return not isinstance(model.get_submodule(owner), NORM_LAYERS)


def trainable_at(model: nn.Module, arch: str, depth: int) -> list[nn.Parameter]:
    """The parameters `freeze(model, arch, depth)` leaves trainable (all but the prefix's), without freezing."""
    frozen = {id(p) for p in split(unwrap(model), arch, depth).prefix.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def layer_lr_scales(arch: str, decay: float) -> Callable[[str], float]:
    """Parameter name -> its factor of the learning rate: `decay`**i in the backbone block i blocks from the head
    (the last block: i = 1), 1 on the head side (timm's layer decay, ULMFiT's discriminative rates)."""
    blocks = layout_of(arch).blocks

    def scale(name: str) -> float:
        for k, (_, paths) in enumerate(blocks):
            if any(name == path or name.startswith(path + ".") for path in paths):
                return block_lr_factor(arch, k, decay)
        return 1.0

    return scale


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    params: list[nn.Parameter] | None = None,
) -> list[dict]:
    """The optimizer's parameter groups of `model`'s trainable parameters (or of `params`): those weight decay
    suits, with `weight_decay`, and the rest with 0 (see is_decayed); with `lr_scale`, one such pair per factor of
    the learning rate, as "lr_scale" (1 without). Groups go by factor, largest (the head's) first, then decayed
    before kept; an empty group is left out."""
    model = unwrap(model)
    wanted = {id(p) for p in params} if params is not None else None
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        selected = p.requires_grad if wanted is None else id(p) in wanted
        if selected:
            scale = lr_scale(name) if lr_scale else 1.0
            groups.setdefault((scale, is_decayed(model, name)), []).append(p)
    return [
        {"params": groups[scale, decayed], "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
        for scale, decayed in sorted(groups, key=lambda key: (-key[0], not key[1]))
    ]
