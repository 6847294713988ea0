"""ConvNeXt: `features` stages, pooling, and a (LayerNorm2d, Flatten, Linear) `classifier`."""

from __future__ import annotations

from torch import nn

from tlray.models.anatomy import Anatomy, classifier_head, feature_blocks


def anatomy(model: nn.Module) -> Anatomy:
    return Anatomy(
        blocks=feature_blocks(model),
        neck=(model.avgpool,),  # no Flatten: classifier.0 (LayerNorm2d) needs the 1x1 map, classifier.1 flattens
        head_side=(model.classifier,),
        head=classifier_head(model),
    )
