"""Torchvision models for transfer learning: block maps, freezing, new heads, preprocessing.

A model is an ordered list of named backbone *blocks*, input to output, followed by
head-side layers (the classifier, ViT's final LayerNorm, ...), trainable unless the whole
backbone is frozen: a feature extractor freezes ViT's final LayerNorm with the blocks.
`freeze_depth = d` freezes the first d blocks: 0 is a full fine-tune, "all" (the number
of blocks) a feature extractor. The block map is read off a model built on the meta
device, so it costs no memory and always matches what torchvision builds.
`split` cuts a model after its first d blocks into a prefix and the rest (sharing the
model's layers), so that frozen-prefix activations can be computed once and cached.

Nothing here downloads unless `build_model` is given a torchvision weights name.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.transforms import v2

# The arch table, and the rules that need no model, live in tlray.archs (importable without torch).
from tlray.models import archs
from tlray.models.archs import SUPPORTED_FAMILIES, ModelError, family_of, resolve_freeze_depth, supported_archs  # noqa: F401

log = logging.getLogger("tlray")


def weights_enum(arch: str):
    family_of(arch)  # a clear error for unsupported archs before torchvision's own
    return torchvision.models.get_model_weights(arch)


# ---------------------------------------------------------------- block map


@dataclass(frozen=True)
class _Layout:
    """Where things are in a model of one arch, as dotted paths (module or parameter)."""

    blocks: tuple[tuple[str, tuple[str, ...]], ...]  # (block name, paths it covers), input -> output
    head: str  # path of the final Linear that build_model replaces


# ViT's bare parameters: the class token prepended to the patches and the position embedding added to them
VIT_EMBEDDINGS = ("class_token", "encoder.pos_embedding")


def _classifier_head(model: nn.Module) -> str:
    # EfficientNet (Dropout, Linear), MobileNet v2 (Dropout, Linear), MobileNet v3
    # (Linear, Hardswish, Dropout, Linear), ConvNeXt (LayerNorm2d, Flatten, Linear):
    # only the last Linear is replaced; the layers before it stay, trainable.
    last = max(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    return f"classifier.{last}"


def _layout_of(family: str, model: nn.Module) -> _Layout:
    if family == "resnet":
        blocks = [("stem", ("conv1", "bn1"))] + [(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]
        return _Layout(tuple(blocks), "fc")
    if family in ("efficientnet", "mobilenet", "convnext"):
        blocks = [(f"features.{i}", (f"features.{i}",)) for i in range(len(model.features))]
        return _Layout(tuple(blocks), _classifier_head(model))
    if family == "regnet":
        blocks = [("stem", ("stem",))]
        blocks += [(name, (f"trunk_output.{name}",)) for name, _ in model.trunk_output.named_children()]
        return _Layout(tuple(blocks), "fc")
    if family == "vit":
        # The stem is the patch embedding plus the two bare parameters added to its output.
        # encoder.ln (after the last layer) is head-side: it trains with the head, except in a feature
        # extractor, whose frozen prefix ends with it (see _pieces).
        blocks = [("stem", ("conv_proj", *VIT_EMBEDDINGS))]
        blocks += [(name, (f"encoder.layers.{name}",)) for name, _ in model.encoder.layers.named_children()]
        return _Layout(tuple(blocks), "heads.head")
    raise AssertionError(f"no block map for family {family}")  # SUPPORTED_FAMILIES and this disagree


class _ParametersOnMeta(TorchFunctionMode):
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
def _layout(arch: str) -> _Layout:
    family = family_of(arch)
    with _ParametersOnMeta():  # shapes only: the block map needs no real weights
        model = torchvision.models.get_model(arch, weights=None)
    return _layout_of(family, model)


def backbone_block_names(arch: str) -> list[str]:
    return [name for name, _ in _layout(arch).blocks]


# ---------------------------------------------------------------- building


def _unwrap(model: nn.Module) -> nn.Module:
    is_wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    return model.module if is_wrapped else model


def head_module(model: nn.Module, arch: str) -> nn.Module:
    return _unwrap(model).get_submodule(_layout(arch).head)


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    path = _layout(arch).head
    parent_path, _, name = path.rpartition(".")
    old = model.get_submodule(path)
    setattr(model.get_submodule(parent_path), name, nn.Linear(old.in_features, num_classes))


def torchvision_weights(arch: str, name: str):
    """The enum member for a weights name ("DEFAULT", "IMAGENET1K_V2", "ResNet18_Weights.DEFAULT"), else None."""
    enum = weights_enum(arch)
    prefix = enum.__name__ + "."
    member = name[len(prefix) :] if name.startswith(prefix) else name
    return enum[member] if member in enum.__members__ else None  # __members__ includes the DEFAULT alias


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise ModelError(f"model.weights: cannot read checkpoint '{path}': {exc}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # common wrappers around the weights
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"model.weights: '{path}' holds no state_dict (expected a dict of tensors, "
            "or one under the key 'state_dict' or 'model')"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_checkpoint(model: nn.Module, arch: str, path: str) -> None:
    state = _read_checkpoint(path)
    expected = model.state_dict()
    # A checkpoint may carry any head (1000 ImageNet classes, or an earlier fine-tune's):
    # head tensors of another shape are dropped, since the head is replaced anyway.
    head = _layout(arch).head
    head_keys = {f"{head}.weight", f"{head}.bias"}
    dropped = {k for k in head_keys if k in state and k in expected and state[k].shape != expected[k].shape}
    state = {k: v for k, v in state.items() if k not in dropped}

    missing = [k for k in expected if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise ModelError(f"model.weights: checkpoint '{path}' does not fit arch '{arch}': {'; '.join(parts)}")
    model.load_state_dict(state, strict=not dropped)  # everything else was checked above


def build_model(arch: str, weights: str | None, num_classes: int) -> nn.Module:
    """A torchvision `arch` with `weights` loaded, then a fresh `num_classes`-way head.

    weights: None = random init; a torchvision weights name ("DEFAULT", "IMAGENET1K_V2")
    = torchvision's pretrained weights (downloads); anything else = a local checkpoint path.
    """
    family_of(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model.num_classes: need a positive number of classes, got {num_classes!r}")
    if weights is None:
        model = torchvision.models.get_model(arch, weights=None)
    elif (member := torchvision_weights(arch, weights)) is not None:
        model = torchvision.models.get_model(arch, weights=member)
    elif os.path.isfile(weights):
        model = torchvision.models.get_model(arch, weights=None)
        _load_checkpoint(model, arch, weights)
    else:
        names = ", ".join(weights_enum(arch).__members__)
        raise ModelError(
            f"model.weights: '{weights}' is neither a weights name of {arch} ({names}) nor an existing checkpoint file"
        )
    _replace_head(model, arch, num_classes)  # weights first, head second
    return model


# ---------------------------------------------------------------- splitting


class _Op(nn.Module):
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


def _vit_stem(x, conv_proj, class_token, pos_embedding, dropout, image_size, hidden_dim):
    # VisionTransformer._process_input, the class token concat of VisionTransformer.forward,
    # then Encoder.forward up to its layers.
    n, _, h, w = x.shape
    torch._assert(h == image_size and w == image_size, f"Wrong image size! Expected {image_size} but got {h}x{w}!")
    x = conv_proj(x).reshape(n, hidden_dim, -1).permute(0, 2, 1)
    x = torch.cat([class_token.expand(n, -1, -1), x], dim=1)
    return dropout(x + pos_embedding)


def _vit_class_token(x):
    return x[:, 0]


def _pieces(family: str, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """torchvision's forward of `model` as (one module per block, the neck, the head side): running all
    three in order is model(x). The neck is what the frozen prefix adds after the last block when the whole
    backbone is frozen, so that a feature extractor's prefix output (what the cache stores) is what the
    head reads: the pooled features, or ViT's class token after the final LayerNorm (768 numbers an image
    for ViT-B, not 197 tokens of 768)."""
    if family == "resnet":
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
        return blocks, [model.avgpool, nn.Flatten(1)], [model.fc]
    if family == "efficientnet":
        return list(model.features), [model.avgpool, nn.Flatten(1)], [model.classifier]
    if family == "mobilenet":
        # MobileNetV2.forward pools with nn.functional.adaptive_avg_pool2d(x, (1, 1)) (no avgpool attribute).
        is_v2 = isinstance(model, torchvision.models.MobileNetV2)
        pool = nn.AdaptiveAvgPool2d((1, 1)) if is_v2 else model.avgpool
        return list(model.features), [pool, nn.Flatten(1)], [model.classifier]
    if family == "convnext":
        return list(model.features), [model.avgpool], [model.classifier]  # classifier.0 (LayerNorm2d) flattens later
    if family == "regnet":
        return [model.stem, *model.trunk_output], [model.avgpool, nn.Flatten(1)], [model.fc]
    if family == "vit":
        stem = _Op(
            _vit_stem,
            conv_proj=model.conv_proj,
            class_token=model.class_token,
            pos_embedding=model.encoder.pos_embedding,
            dropout=model.encoder.dropout,
            image_size=model.image_size,
            hidden_dim=model.hidden_dim,
        )
        # partial depths train encoder.ln with the head; a feature extractor freezes it (the neck has parameters)
        return [stem, *model.encoder.layers], [model.encoder.ln, _Op(_vit_class_token)], [model.heads]
    raise AssertionError(f"no split for family {family}")  # SUPPORTED_FAMILIES and this disagree


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
    if model is not _unwrap(model):
        raise ModelError("split() needs the bare model, not a DistributedDataParallel/DataParallel wrapper")
    depth = resolve_freeze_depth(arch, depth)
    blocks, neck, head = _pieces(family_of(arch), model)
    assert len(blocks) == len(_layout(arch).blocks), f"{arch}: the split and the block map disagree"
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


# ---------------------------------------------------------------- freezing


@dataclass(frozen=True)
class FreezeSummary:
    depth: int
    total_blocks: int
    frozen_blocks: list[str]
    trainable_params: int  # numel sums
    frozen_params: int


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


def _lock_eval(module: nn.Module) -> None:
    module.train = functools.partial(_train_locked_in_eval, module)  # instance attribute wins over the class method
    module.train(False)


def _unlock(module: nn.Module, training: bool) -> None:
    module.__dict__.pop("train", None)
    module.training = training


def freeze(model: nn.Module, arch: str, depth: int | str, batchnorm: str = "frozen") -> FreezeSummary:
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
    """
    if model is not _unwrap(model):
        raise ModelError(
            "model.freeze_depth: freeze() was given a DistributedDataParallel/DataParallel model; "
            "freeze the bare model first, then wrap it (ray.train.torch.prepare_model)"
        )
    if batchnorm not in ("frozen", "train"):
        raise ModelError(f"model.batchnorm: must be 'frozen' or 'train', got {batchnorm!r}")
    depth = resolve_freeze_depth(arch, depth)
    blocks = _layout(arch).blocks

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
            _lock_eval(m)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen_names = [name for name, _ in blocks[:depth]]
    log.info(
        "trainable %d / frozen %d parameters (freeze_depth %d of %d: blocks %s)",
        trainable,
        frozen,
        depth,
        len(blocks),
        ", ".join(frozen_names) or "none",
    )
    return FreezeSummary(depth, len(blocks), frozen_names, trainable, frozen)


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
    if isinstance(model, torchvision.models.VisionTransformer) and name in VIT_EMBEDDINGS:
        return False
    return not isinstance(model.get_submodule(owner), NORM_LAYERS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups of `model`'s trainable parameters: those weight decay suits, with
    `weight_decay`, and the rest with 0 (see is_decayed). An empty group is left out."""
    model = _unwrap(model)
    decayed, kept = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decayed if is_decayed(model, name) else kept).append(p)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# ---------------------------------------------------------------- preprocessing


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
