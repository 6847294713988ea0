"""A checkpoint's model state: what training changed, over the weights the run started from.

With frozen blocks, most of a model is its starting weights, unchanged: a checkpoint of a head-only run keeps
kilobytes (the head, BatchNorm's statistics) instead of the whole backbone every epoch. Resume, export and scoring
load it over a model built from those weights, which must be the same version (their identity, tlray.plan.Weights).
"""

from __future__ import annotations

from torch import nn

from tlray.errors import UserError


def trained_state(model: nn.Module, whole: dict) -> dict:
    """Of `whole` (the model's state_dict), what training can change: its trainable parameters, and every buffer
    (BatchNorm's running statistics, a few kilobytes, move in frozen blocks too with `model.batchnorm: train`)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    trained |= {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in whole.items() if name in trained}


def load_model_state(model: nn.Module, saved: dict, weights_identity: str | None) -> None:
    """A checkpoint's model state (`saved`: a state.pt dict) into `model`, which holds the run's starting weights.
    A checkpoint of the trained tensors only fills in the rest from those weights: they must be the ones it was
    trained from."""
    frozen_from = saved.get("frozen_from")
    if frozen_from is None:
        model.load_state_dict(saved["model"])
        return
    if frozen_from != weights_identity:
        raise UserError(
            f"model.weights: the checkpoint of epoch {saved['epoch'] + 1} holds the trained tensors only, over the "
            f"weights '{frozen_from}'; the run's weights are now '{weights_identity}'. Restore those weights, or "
            "start a new run (another output.uri or name)"
        )
    result = model.load_state_dict(saved["model"], strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
