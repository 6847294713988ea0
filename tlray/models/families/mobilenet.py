"""MobileNet v2 and v3: `features` stages, pooling, and a `classifier` ending in a Linear."""

from __future__ import annotations

import torchvision
from torch import nn

from tlray.models.anatomy import Anatomy, classifier_head, feature_blocks


def anatomy(model: nn.Module) -> Anatomy:
    # MobileNetV2.forward pools with nn.functional.adaptive_avg_pool2d(x, (1, 1)) (no avgpool attribute).
    is_v2 = isinstance(model, torchvision.models.MobileNetV2)
    pool = nn.AdaptiveAvgPool2d((1, 1)) if is_v2 else model.avgpool
    return Anatomy(
        blocks=feature_blocks(model),
        neck=(pool, nn.Flatten(1)),
        head_side=(model.classifier,),
        head=classifier_head(model),
    )
