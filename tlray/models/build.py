"""Building a model: a torchvision arch, its weights (torchvision's or a checkpoint's), a new head.

Nothing here downloads unless `build_model` is given a torchvision weights name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from tlray.archs import ModelError, family_of
from tlray.models.layout import layout_of


def weights_enum(arch: str):
    family_of(arch)  # a clear error for unsupported archs before torchvision's own
    return torchvision.models.get_model_weights(arch)


def torchvision_weights(arch: str, name: str):
    """The enum member for a weights name ("DEFAULT", "IMAGENET1K_V2", "ResNet18_Weights.DEFAULT"), else None."""
    enum = weights_enum(arch)
    prefix = enum.__name__ + "."
    member = name[len(prefix) :] if name.startswith(prefix) else name
    return enum[member] if member in enum.__members__ else None  # __members__ includes the DEFAULT alias


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


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    path = layout_of(arch).head
    parent_path, _, name = path.rpartition(".")
    old = model.get_submodule(path)
    setattr(model.get_submodule(parent_path), name, nn.Linear(old.in_features, num_classes))


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
    head = layout_of(arch).head
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
