"""EfficientNet (B0-B7, V2): `features` stages, pooling, and a (Dropout, Linear) `classifier`."""

from __future__ import annotations

from torch import nn

from tlray.models.anatomy import Anatomy, classifier_head, feature_blocks


def anatomy(model: nn.Module) -> Anatomy:
    return Anatomy(
        blocks=feature_blocks(model),
        neck=(model.avgpool, nn.Flatten(1)),
        head_side=(model.classifier,),
        head=classifier_head(model),
    )
