"""ResNet, ResNeXt and Wide ResNet: a stem, four stages, pooling and one Linear `fc`."""

from __future__ import annotations

from torch import nn

from tlray.models.anatomy import Anatomy, Block


def anatomy(model: nn.Module) -> Anatomy:
    # The stem's ReLU and max pool hold no parameters: the block covers conv1 and bn1, and runs all four.
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [Block(f"layer{i}", (f"layer{i}",), getattr(model, f"layer{i}")) for i in range(1, 5)]
    return Anatomy(
        blocks=(Block("stem", ("conv1", "bn1"), stem), *stages),
        neck=(model.avgpool, nn.Flatten(1)),
        head_side=(model.fc,),
        head="fc",
    )
