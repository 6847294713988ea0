"""RegNet X and Y: a `stem`, the `trunk_output` stages (block1..block4), pooling and one Linear `fc`."""

from __future__ import annotations

from torch import nn

from tlray.models.anatomy import Anatomy, Block


def anatomy(model: nn.Module) -> Anatomy:
    stages = [Block(name, (f"trunk_output.{name}",), stage) for name, stage in model.trunk_output.named_children()]
    return Anatomy(
        blocks=(Block("stem", ("stem",), model.stem), *stages),
        neck=(model.avgpool, nn.Flatten(1)),
        head_side=(model.fc,),
        head="fc",
    )
