"""tlray.models.split: prefix + rest compose to the model, share its parameters; freezing locks the prefix in eval.

Random-init models (weights=None), one arch per family; inputs are 2 images of 64 px (ViT: 1 of 224 px).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from tlray.archs import ModelError
from tlray.models.build import build_model
from tlray.models.freeze import freeze, trainable_parameters
from tlray.models.layout import backbone_block_names, layout_of
from tlray.models.split import prefix_output_shape, split
from tlray.plan import preprocessing

FEATURE_EXTRACTOR_NECK = {"vit_b_32": ["encoder.ln"]}  # frozen with the blocks at the full depth only
ARCHS = [
    "resnet18",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "convnext_tiny",
    "regnet_x_400mf",
    "vit_b_32",
]


@functools.cache
def _built(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, None, 3).eval()


def fresh(arch: str) -> nn.Module:
    return copy.deepcopy(_built(arch))


def batch_for(arch: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, 3, 224, 224) if arch.startswith("vit") else torch.randn(2, 3, 64, 64)


def depths(arch: str) -> list:
    return [*range(len(backbone_block_names(arch)) + 1), "all"]


def block_param_ids(model: nn.Module, arch: str, depth: int) -> set[int]:
    """The parameters the first `depth` block paths cover, read off the block map; at the full depth also
    the head-side layers before the head's input (ViT's final LayerNorm)."""
    blocks = layout_of(arch).blocks
    paths = [path for _, block in blocks[:depth] for path in block]
    paths += FEATURE_EXTRACTOR_NECK.get(arch, []) if depth == len(blocks) else []
    return {id(p) for path in paths for p in params_at(model, path)}


def params_at(model: nn.Module, path: str) -> list[nn.Parameter]:
    try:
        return list(model.get_submodule(path).parameters())
    except AttributeError:  # a bare parameter such as ViT's class_token
        return [model.get_parameter(path)]


def own_modules(model: nn.Module, part: nn.Module) -> list[nn.Module]:
    """The model's own modules that `part` runs (not split's wrappers)."""
    ids = {id(m) for m in model.modules()}
    return [m for m in part.modules() if id(m) in ids]


@pytest.mark.parametrize("arch", ARCHS)
def test_rest_of_prefix_is_the_model(arch):
    model, x = _built(arch), batch_for(arch)
    with torch.no_grad():
        expected = model(x)
        for depth in depths(arch)[:-1]:  # "all" resolves to the last one (next test)
            s = split(model, arch, depth)
            torch.testing.assert_close(s.rest(s.prefix(x)), expected, rtol=0, atol=0, msg=f"depth {depth}")


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_holds_the_first_blocks_parameters(arch):
    model = _built(arch)
    all_ids = {id(p) for p in model.parameters()}
    n = len(backbone_block_names(arch))
    for depth in depths(arch):
        d = n if depth == "all" else depth
        s = split(model, arch, depth)
        prefix_ids, rest_ids = {id(p) for p in s.prefix.parameters()}, {id(p) for p in s.rest.parameters()}
        assert prefix_ids == block_param_ids(model, arch, d), depth
        assert rest_ids == all_ids - prefix_ids, depth
    assert isinstance(split(model, arch, 0).prefix, nn.Identity)


@pytest.mark.parametrize(("arch", "shape"), [("resnet18", (512,)), ("convnext_tiny", (768, 1, 1))])
def test_feature_extractor_prefix_is_pooled(arch, shape):
    model = _built(arch)
    s = split(model, arch, "all")
    with torch.no_grad():
        assert s.prefix(batch_for(arch)).shape == (2, *shape)
    model.train()
    try:
        assert prefix_output_shape(s, 64) == shape
        assert all(m.training for m in model.modules())  # the helper restores the modes
    finally:
        model.eval()
    assert prefix_output_shape(split(model, arch, 0), 64) == (3, 64, 64)


def test_split_refuses_bad_depth_and_wrapped_models():
    with pytest.raises(ModelError, match="^model.freeze_depth"):
        split(_built("resnet18"), "resnet18", 6)
    with pytest.raises(ModelError, match="bare model"):
        split(nn.DataParallel(_built("resnet18")), "resnet18", 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_blocks_stay_in_eval(arch):
    model = fresh(arch)
    n = len(backbone_block_names(arch))
    for depth in (n // 2, n):
        freeze(model, arch, depth, batchnorm="frozen")
        model.train()
        s = split(model, arch, depth)
        assert own_modules(model, s.prefix) and own_modules(model, s.rest)
        assert not any(m.training for m in own_modules(model, s.prefix)), depth
        assert all(m.training for m in own_modules(model, s.rest)), depth
    # batchnorm: train: the frozen BatchNorm layers follow model.train(); Dropout, StochasticDepth & co. stay off
    freeze(model, arch, n // 2, batchnorm="train")
    model.train()
    s = split(model, arch, n // 2)
    is_batchnorm = [isinstance(m, nn.modules.batchnorm._BatchNorm) for m in own_modules(model, s.prefix)]
    assert [m.training for m in own_modules(model, s.prefix)] == is_batchnorm
    assert all(m.training for m in own_modules(model, s.rest))
    model.eval()
    assert not any(m.training for m in model.modules())


def test_frozen_prefix_is_a_pure_function_of_the_image():
    arch, depth = "efficientnet_b0", 5
    model = fresh(arch)
    freeze(model, arch, depth)
    prefix = split(model, arch, depth).prefix
    assert any(isinstance(m, StochasticDepth) for m in prefix.modules())
    x = batch_for(arch)
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        first, second = prefix(x), prefix(x)
        model.eval()
        evaluated = prefix(x)
    assert torch.equal(first, second) and torch.equal(first, evaluated)
    clone = copy.deepcopy(model)  # the lock survives copying
    clone.train()
    assert not any(m.training for m in own_modules(clone, split(clone, arch, depth).prefix))


# What the spec must refuse: ViT runs at the one size it is built for (224 here), ConvNeXt needs 32 px.
REFUSED_SIZES = {("convnext_tiny", 8), ("vit_b_32", 8), ("vit_b_32", 40)}


@pytest.mark.parametrize("image_size", [8, 40])  # the spec's smallest size, and one no preset has
@pytest.mark.parametrize("arch", ARCHS)
def test_a_non_default_image_size_trains_a_step_or_is_refused_by_the_spec(arch, image_size, tmp_path):
    from tlray.spec import SpecError, validate_spec

    from conftest import spec_dict

    depth = len(backbone_block_names(arch)) // 2
    raw = spec_dict(str(tmp_path / "images"), str(tmp_path / "out"))
    raw["dataset"]["image_size"] = image_size
    raw["model"] = {"arch": arch, "weights": "DEFAULT", "mode": "partial", "freeze_depth": depth}
    if (arch, image_size) in REFUSED_SIZES:
        with pytest.raises(SpecError) as refused:
            validate_spec(raw)
        assert [p.key for p in refused.value.problems] == ["dataset.image_size"]
        return
    spec = validate_spec(raw)
    crop = preprocessing(arch, spec.dataset.image_size, spec.model.weights).crop_size
    assert crop == image_size
    model = fresh(arch)
    freeze(model, arch, depth)
    model.train()
    parts = split(model, arch, depth)
    torch.manual_seed(0)
    with torch.no_grad():  # as the workers run the frozen prefix
        features = parts.prefix(torch.randn(2, 3, crop, crop))
    loss = nn.functional.cross_entropy(parts.rest(features), torch.tensor([0, 2]))
    loss.backward()
    grads = [p.grad for p in trainable_parameters(model)]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vit_feature_extractor_prefix_ends_at_the_class_token_the_head_reads():
    from tlray.training.prefix_cache import activation_bytes

    arch, hidden_dim = "vit_b_32", 768
    model = fresh(arch)
    freeze(model, arch, "all")
    head_input = []
    hook = model.heads.register_forward_hook(lambda module, args, out: head_input.append(args[0]))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    try:
        with torch.no_grad():
            expected = model(x)
            s = split(model, arch, "all")
            features = s.prefix(x)
            out = s.rest(features)
    finally:
        hook.remove()
    assert features.shape == (2, hidden_dim)
    torch.testing.assert_close(features, head_input[0], rtol=0, atol=0)  # LayerNorm'ed class token
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.encoder.ln.parameters())  # in the prefix, so frozen
    assert all(p.requires_grad for p in model.heads.parameters())

    # the cache holds one vector an image, not 50 tokens (197 at patch size 16)
    shape = prefix_output_shape(s, 224)
    assert shape == (hidden_dim,)
    counts = {"train": 30, "val": 10}
    assert activation_bytes(shape, counts, "float32") == 40 * hidden_dim * 4
    assert activation_bytes(shape, counts, "bfloat16") == 40 * hidden_dim * 2
    # a partial depth keeps every token, and encoder.ln trains with the head
    freeze(model, arch, 12)
    assert prefix_output_shape(split(model, arch, 12), 224) == (50, hidden_dim)
    assert all(p.requires_grad for p in model.encoder.ln.parameters())
