"""What tests/unit/models shares: hand-written block maps and heads, one model per arch built once.

The expected block maps below are written out by hand, independently of tlray.models.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from tlray.models.build import build_model

# arch -> (expected blocks as lists of dotted paths, head path, head-side prefixes never frozen)
EXPECTED = {
    "resnet18": (
        [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
        "fc",
        ["fc"],
    ),
    "efficientnet_b0": ([[f"features.{i}"] for i in range(9)], "classifier.1", ["classifier"]),
    "efficientnet_v2_s": ([[f"features.{i}"] for i in range(8)], "classifier.1", ["classifier"]),
    "mobilenet_v2": ([[f"features.{i}"] for i in range(19)], "classifier.1", ["classifier"]),
    "mobilenet_v3_small": ([[f"features.{i}"] for i in range(13)], "classifier.3", ["classifier"]),
    "convnext_tiny": ([[f"features.{i}"] for i in range(8)], "classifier.2", ["classifier"]),
    "regnet_x_400mf": (
        [["stem"]] + [[f"trunk_output.block{i}"] for i in range(1, 5)],
        "fc",
        ["fc"],
    ),
    "vit_b_32": (
        [["conv_proj", "class_token", "encoder.pos_embedding"]]
        + [[f"encoder.layers.encoder_layer_{i}"] for i in range(12)],
        "heads.head",
        ["encoder.ln", "heads"],
    ),
}
ONE_PER_FAMILY = ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "regnet_x_400mf", "vit_b_32"]
NUM_CLASSES = 3


@functools.cache
def _built(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, None, NUM_CLASSES)


def fresh(arch: str) -> nn.Module:
    """A new random-init model with a NUM_CLASSES head (built once per arch, then copied)."""
    return copy.deepcopy(_built(arch))
