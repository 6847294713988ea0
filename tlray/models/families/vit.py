"""Vision Transformer: a patch-embedding stem with two bare parameters, encoder layers, a final LayerNorm.

torchvision's VisionTransformer.forward is one function, not a chain of modules: its stem (patch
embedding, class token, position embedding) and its class-token selection are written out here as
functions, so that the model can be cut between any two encoder layers.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from tlray.models.anatomy import Anatomy, Block, Op

# The bare parameters: the class token prepended to the patches and the position embedding added to them
EMBEDDINGS = ("class_token", "encoder.pos_embedding")


def anatomy(model: nn.Module) -> Anatomy:
    # The stem is the patch embedding plus the two bare parameters added to its output.
    stem = Op(
        _vit_stem,
        conv_proj=model.conv_proj,
        class_token=model.class_token,
        pos_embedding=model.encoder.pos_embedding,
        dropout=model.encoder.dropout,
        image_size=model.image_size,
        hidden_dim=model.hidden_dim,
    )
    layers = [Block(name, (f"encoder.layers.{name}",), layer) for name, layer in model.encoder.layers.named_children()]
    return Anatomy(
        blocks=(Block("stem", ("conv_proj", *EMBEDDINGS), stem), *layers),
        # encoder.ln (after the last layer) is head-side: partial depths train it with the head; a feature
        # extractor's frozen prefix ends with it (the neck has parameters)
        neck=(model.encoder.ln, Op(_vit_class_token)),
        head_side=(model.heads,),
        head="heads.head",
    )


def is_embedding(model: nn.Module, name: str) -> bool:
    """Whether the parameter `name` of the bare `model` is a ViT's class token or position embedding."""
    return isinstance(model, torchvision.models.VisionTransformer) and name in EMBEDDINGS


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
