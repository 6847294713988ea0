"""tlray.models: block maps, freezing (params, optimizer, BatchNorm, DDP), checkpoints, preprocessing.

Everything builds with weights=None (no downloads); checkpoints are written to tmp_path.
The expected block maps below are written out by hand, independently of tlray.models.
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
import socket

import pytest
import torch
import torchvision
from torch import nn

from tlray.models import model as models
from tlray.models.model import ModelError, archs

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
# head-side layers a feature extractor freezes too: its prefix ends where the head reads (ViT: the class token
# after the final LayerNorm), so the cache stores one vector per image
FEATURE_EXTRACTOR_NECK = {"vit_b_32": ["encoder.ln"]}
ONE_PER_FAMILY = ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "regnet_x_400mf", "vit_b_32"]
WITH_BATCHNORM = ["resnet18", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf"]
HEAD_SIDE = {
    "resnet": ["fc"],
    "efficientnet": ["classifier"],
    "mobilenet": ["classifier"],
    "convnext": ["classifier"],
    "regnet": ["fc"],
    "vit": ["encoder.ln", "heads"],
}
NUM_CLASSES = 3


# ---------------------------------------------------------------- helpers (no tlray.models inside)


def params_at(model: nn.Module, path: str) -> list[nn.Parameter]:
    """The parameters under a dotted path, found by walking attributes by hand."""
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return list(obj.parameters()) if isinstance(obj, nn.Module) else [obj]


def modules_at(model: nn.Module, path: str) -> list[nn.Module]:
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return list(obj.modules()) if isinstance(obj, nn.Module) else []


def numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def batch_for(arch: str) -> torch.Tensor:
    torch.manual_seed(0)
    # ViT needs its 224 px input; batch 1 keeps it cheap. Others: 2 images of 64 px.
    return torch.randn(1, 3, 224, 224) if arch.startswith("vit") else torch.randn(2, 3, 64, 64)


def batchnorms(model: nn.Module, paths: list[str]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for p in paths for m in modules_at(model, p) if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_state(bns) -> list[torch.Tensor]:
    return [t.clone() for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@functools.cache
def _built(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model(arch, None, NUM_CLASSES)


def fresh(arch: str) -> nn.Module:
    """A new random-init model with a NUM_CLASSES head (built once per arch, then copied)."""
    return copy.deepcopy(_built(arch))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    dist.destroy_process_group()


# ---------------------------------------------------------------- block maps


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_block_map_matches_the_hand_written_one(arch):
    blocks, head, _ = EXPECTED[arch]
    assert len(models.backbone_block_names(arch)) == len(blocks)
    assert models.resolve_freeze_depth(arch, "all") == len(blocks)
    model = fresh(arch)
    assert models.head_module(model, arch) is model.get_submodule(head)


def test_block_names_are_readable():
    assert models.backbone_block_names("resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert models.backbone_block_names("convnext_tiny")[3] == "features.3"
    assert models.backbone_block_names("vit_b_32")[6] == "encoder_layer_5"
    assert models.backbone_block_names("regnet_x_400mf") == ["stem", "block1", "block2", "block3", "block4"]


@pytest.mark.parametrize("arch", models.supported_archs())
def test_every_supported_arch_blocks_cover_the_backbone(arch):
    """On the meta device (no memory): blocks are disjoint, and every parameter outside them is head-side."""
    with models._ParametersOnMeta():  # plain torch.device("meta") cannot build RegNet
        model = torchvision.models.get_model(arch, weights=None)
    layout = models._layout(arch)
    owner: dict[str, str] = {}
    names = dict(model.named_parameters())
    for block, paths in layout.blocks:
        for path in paths:
            prefix = path + "."
            hits = [n for n in names if n == path or n.startswith(prefix)]
            assert hits, f"{arch}: {path} holds no parameters"
            for n in hits:
                assert n not in owner, f"{arch}: {n} is in {owner.get(n)} and {block}"
                owner[n] = block
    head_side = HEAD_SIDE[models.family_of(arch)]
    rest = [n for n in names if n not in owner]
    assert rest and all(any(n == h or n.startswith(h + ".") for h in head_side) for n in rest), rest
    assert isinstance(model.get_submodule(layout.head), nn.Linear)


def test_supported_families_and_errors():
    assert set(models.SUPPORTED_FAMILIES) == {"resnet", "efficientnet", "mobilenet", "convnext", "regnet", "vit"}
    assert models.family_of("resnext50_32x4d") == "resnet"
    assert models.family_of("efficientnet_v2_l") == "efficientnet"
    with pytest.raises(ModelError, match=r"^model\.arch: unknown arch 'resnet19'; did you mean 'resnet18'\?"):
        models.family_of("resnet19")
    with pytest.raises(ModelError, match="model.arch"):
        models.backbone_block_names("alexnet")
    assert models.weights_enum("resnet18") is torchvision.models.ResNet18_Weights


@pytest.mark.parametrize("bad", [-1, 6, 2.5, "most", "", True, None])
def test_resolve_freeze_depth_errors(bad):
    with pytest.raises(ModelError, match=r"^model\.freeze_depth: .*0\.\.5.*layer4") as err:
        models.resolve_freeze_depth("resnet18", bad)
    assert isinstance(err.value, ValueError)


def test_resolve_freeze_depth_values():
    import numpy as np

    assert models.resolve_freeze_depth("resnet18", 0) == 0
    assert models.resolve_freeze_depth("resnet18", 5) == 5
    assert models.resolve_freeze_depth("resnet18", "all") == 5
    assert models.resolve_freeze_depth("resnet18", np.int64(3)) == 3  # as Tune samples it
    assert models.resolve_freeze_depth("vit_b_32", "all") == 13


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_counts_at_every_depth(arch):
    blocks, head, head_side = EXPECTED[arch]
    model = fresh(arch)
    total = numel(model.parameters())
    assert model.get_submodule(head).out_features == NUM_CLASSES
    for depth in [*range(len(blocks) + 1), "all"]:
        d = len(blocks) if depth == "all" else depth
        summary = models.freeze(model, arch, depth)
        neck = FEATURE_EXTRACTOR_NECK.get(arch, []) if d == len(blocks) else []
        frozen = numel(
            p for path in [*(path for block in blocks[:d] for path in block), *neck] for p in params_at(model, path)
        )
        assert summary == models.FreezeSummary(
            d, len(blocks), models.backbone_block_names(arch)[:d], total - frozen, frozen
        )
        assert numel(p for p in model.parameters() if not p.requires_grad) == frozen
        assert numel(models.trainable_parameters(model)) == total - frozen
    # "all": exactly the head-side layers after the neck remain trainable
    trained_side = [path for path in head_side if path not in FEATURE_EXTRACTOR_NECK.get(arch, [])]
    assert numel(models.trainable_parameters(model)) == numel(
        p for path in trained_side for p in params_at(model, path)
    )
    assert all(p.requires_grad for path in trained_side for p in params_at(model, path))
    models.freeze(model, arch, len(blocks) - 1)  # a partial depth trains every head-side layer
    assert all(p.requires_grad for path in head_side for p in params_at(model, path))


def test_freeze_logs_counts(caplog):
    model = fresh("resnet18")
    with caplog.at_level("INFO", logger="tlray"):
        s = models.freeze(model, "resnet18", 2)
    assert f"trainable {s.trainable_params} / frozen {s.frozen_params} parameters" in caplog.text
    assert "freeze_depth 2 of 5: blocks stem, layer1" in caplog.text


def test_freeze_rejects_bad_batchnorm_and_depth():
    model = fresh("resnet18")
    with pytest.raises(ModelError, match="^model.batchnorm"):
        models.freeze(model, "resnet18", 1, batchnorm="sometimes")
    with pytest.raises(ModelError, match="^model.freeze_depth"):
        models.freeze(model, "resnet18", 9)


@pytest.mark.parametrize("arch", ONE_PER_FAMILY + ["mobilenet_v2"])
def test_sgd_step_leaves_frozen_parameters_untouched(arch):
    blocks, _, _ = EXPECTED[arch]
    model = fresh(arch)
    depth = len(blocks) // 2
    models.freeze(model, arch, depth)
    frozen = [p for block in blocks[:depth] for path in block for p in params_at(model, path)]
    before = [p.detach().clone() for p in frozen]
    trainable = models.trainable_parameters(model)
    trainable_before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in held} & {id(p) for p in frozen}

    model.train()
    x, y = batch_for(arch), torch.tensor([0, 2][: len(batch_for(arch))])
    for _ in range(2):  # the second step exercises momentum
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    assert all(p.grad is None for p in frozen)
    assert any(not torch.equal(p, b) for p, b in zip(trainable, trainable_before, strict=True))


@pytest.mark.parametrize("arch", WITH_BATCHNORM)
def test_frozen_batchnorm_keeps_its_statistics(arch):
    blocks, _, _ = EXPECTED[arch]
    model = fresh(arch)
    depth = 2
    models.freeze(model, arch, depth, batchnorm="frozen")
    frozen_bns = batchnorms(model, [p for b in blocks[:depth] for p in b])
    trainable_bns = batchnorms(model, [p for b in blocks[depth:] for p in b])
    assert frozen_bns and trainable_bns
    frozen_before = bn_state(frozen_bns)
    x = batch_for(arch)

    model.train()
    assert not any(bn.training for bn in frozen_bns) and all(bn.training for bn in trainable_bns)
    trainable_before = bn_state(trainable_bns)
    model(x)
    assert same(bn_state(frozen_bns), frozen_before)
    assert not same(bn_state(trainable_bns), trainable_before)  # unfrozen BN still learns its statistics

    model.eval()
    model.train()  # again
    model(x)
    assert same(bn_state(frozen_bns), frozen_before)

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone_bns = batchnorms(clone, [p for b in blocks[:depth] for p in b])
        clone.train()
        clone(x)
        assert same(bn_state(clone_bns), frozen_before)
        assert not any(bn.training for bn in clone_bns)
    assert same(bn_state(frozen_bns), frozen_before)  # the clones' layers are their own


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_batchnorm_train_keeps_updating_frozen_statistics(arch):
    blocks, _, _ = EXPECTED[arch]
    model = fresh(arch)
    models.freeze(model, arch, 2, batchnorm="train")
    frozen_bns = batchnorms(model, [p for b in blocks[:2] for p in b])
    before = bn_state(frozen_bns)
    model.train()
    model(batch_for(arch))
    assert not same(bn_state(frozen_bns), before)
    assert all(not p.requires_grad for bn in frozen_bns for p in bn.parameters())


def test_refreezing_shallower_releases_batchnorm():
    model = fresh("resnet18")
    models.freeze(model, "resnet18", 3)
    models.freeze(model, "resnet18", 1)
    model.train()
    assert model.layer2[0].bn1.training and not model.bn1.training
    assert all(p.requires_grad for p in model.layer2.parameters())


def test_freeze_refuses_a_ddp_wrapped_model(process_group):
    ddp = nn.parallel.DistributedDataParallel(fresh("resnet18"))
    with pytest.raises(ModelError, match="^model.freeze_depth: .*DistributedDataParallel"):
        models.freeze(ddp, "resnet18", 2)
    assert models.head_module(ddp, "resnet18").out_features == NUM_CLASSES


def test_frozen_model_trains_under_ddp(process_group):
    model = fresh("resnet18")
    models.freeze(model, "resnet18", 3)  # before wrapping, as prepare_model would be called after
    frozen = [p for path in ["conv1", "bn1", "layer1", "layer2"] for p in params_at(model, path)]
    before = [p.detach().clone() for p in frozen]
    bns = batchnorms(model, ["bn1", "layer1", "layer2"])
    bn_before = bn_state(bns)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(models.trainable_parameters(ddp), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ddp.train()
    x, y = batch_for("resnet18"), torch.tensor([0, 1])
    for _ in range(2):  # the second step is where a wrong freeze fails ("Expected to have finished reduction")
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    assert same(bn_state(bns), bn_before)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_build_from_checkpoint(arch, tmp_path):
    _, head, _ = EXPECTED[arch]
    torch.manual_seed(1)
    source = torchvision.models.get_model(arch, weights=None)  # 1000-class ImageNet head
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    del source

    model = models.build_model(arch, str(path), NUM_CLASSES)
    assert models.head_module(model, arch).out_features == NUM_CLASSES
    loaded = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k not in head_keys)
    assert loaded[f"{head}.weight"].shape[0] == NUM_CLASSES


def test_build_from_wrapped_checkpoint_with_another_head(tmp_path):
    """A tlray/DDP-style checkpoint: {"model": {"module.<key>": ...}} with a 5-class head."""
    source = models.build_model("resnet18", None, 5)
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "c.pt")
    model = models.build_model("resnet18", str(tmp_path / "c.pt"), 2)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 2
    torch.save({"state_dict": source.state_dict()}, tmp_path / "s.pt")
    assert torch.equal(models.build_model("resnet18", str(tmp_path / "s.pt"), 2).conv1.weight, source.conv1.weight)


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"^model\.weights: .*(missing|unexpected) keys") as err:
        models.build_model("resnet18", str(tmp_path / "m.pt"), NUM_CLASSES)
    assert "conv1.weight" in str(err.value)


def test_bad_weights_values(tmp_path):
    with pytest.raises(ModelError, match=r"^model\.weights: 'nope\.pt' is neither .*IMAGENET1K_V1"):
        models.build_model("resnet18", "nope.pt", NUM_CLASSES)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match=r"^model\.weights: cannot read"):
        models.build_model("resnet18", str(tmp_path / "junk.pt"), NUM_CLASSES)
    with pytest.raises(ModelError, match=r"^model\.num_classes"):
        models.build_model("resnet18", None, 0)


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_from_torchvision_metadata():
    from PIL import Image

    p = models.preprocessing("resnet18", None)
    assert (p.crop_size, p.resize_size, p.interpolation) == (224, 256, "bilinear")
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and p.std == pytest.approx((0.229, 0.224, 0.225))
    assert models.preprocessing("efficientnet_b0", None).interpolation == "bicubic"

    small = models.preprocessing("resnet18", 32)
    assert (small.crop_size, small.resize_size) == (32, round(256 * 32 / 224))
    assert json.loads(json.dumps(small.to_dict())) == small.to_dict()

    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy(), "RGB")
    out = small.eval_transform()(image)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    shipped = small.uint8_transform(False)(image)
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 32, 32)
    # the uint8 path (decode in Ray Data, normalise on the device) gives the reference's pixels
    torch.testing.assert_close(small.normalise(shipped[None])[0], out, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    augmented = small.uint8_transform(True)(image)
    assert augmented.shape == (3, 32, 32) and not torch.equal(augmented, shipped)
    with pytest.raises(ModelError, match="image_size"):
        models.preprocessing("resnet18", 0)


def test_preprocessing_follows_the_chosen_weights():
    v1, v2 = (
        models.preprocessing("resnet50", None, "IMAGENET1K_V1"),
        models.preprocessing("resnet50", None, "IMAGENET1K_V2"),
    )
    assert (v1.resize_size, v1.crop_size, v1.interpolation) == (256, 224, "bilinear")
    assert (v2.resize_size, v2.crop_size, v2.interpolation) == (232, 224, "bilinear")
    assert (
        models.preprocessing("resnet50", None, "DEFAULT")
        == v2
        == models.preprocessing("resnet50", None, "ResNet50_Weights.IMAGENET1K_V2")
    )
    assert models.preprocessing("resnet50", 112, "IMAGENET1K_V1").resize_size == 128  # 256 scaled by 112/224
    assert models.preprocessing("resnet50", 112, "IMAGENET1K_V2").resize_size == 116
    swag = models.preprocessing("regnet_y_16gf", None, "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.resize_size, swag.crop_size, swag.interpolation) == (384, 384, "bicubic")
    # a checkpoint, or random init: the DEFAULT preset
    assert models.preprocessing("resnet50", None, "/models/resnet50.pt") == v2 == models.preprocessing("resnet50", None)


def test_vit_preprocessing_is_the_size_its_model_is_built_for():
    swag = models.preprocessing("vit_b_16", None, "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.resize_size, swag.crop_size, swag.interpolation) == (384, 384, "bicubic")
    # vit_h_14's DEFAULT preset is 518 px, but without torchvision weights the model is built for 224
    assert models.preprocessing("vit_h_14", None, "DEFAULT").crop_size == 518
    for weights in (None, "/models/vit_h_14.pt"):
        p = models.preprocessing("vit_h_14", None, weights)
        assert (p.crop_size, p.resize_size, p.interpolation) == (224, 224, "bicubic")
    with pytest.raises(ModelError, match=r"^dataset.image_size: vit_b_32 .* 224 px"):
        models.preprocessing("vit_b_32", 64, "DEFAULT")
    with pytest.raises(ModelError, match=r"^dataset.image_size: convnext_tiny needs .* at least 32 px"):
        models.preprocessing("convnext_tiny", 16)


@pytest.mark.parametrize("arch", [a for a, arch in archs.ARCHS.items() if arch.family == "vit"])
def test_vit_sizes_match_torchvision(arch):
    """tlray.archs's table of ViT sizes (read without torch) against torchvision's weights and builder."""
    enum = torchvision.models.get_model_weights(arch)
    for name in enum.__members__:  # DEFAULT included
        member = enum[name]
        assert archs.fixed_input_size(arch, name) == member.meta["min_size"][0] == member.transforms().crop_size[0]
    with models._ParametersOnMeta():
        built = torchvision.models.get_model(arch, weights=None)
    assert archs.fixed_input_size(arch, None) == archs.fixed_input_size(arch, "/a/checkpoint.pt") == built.image_size


# ---------------------------------------------------------------- weight decay


def group_names(model: nn.Module, groups: list[dict]) -> dict[float, set[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in groups}


@pytest.mark.parametrize("depth", [0, 2])
def test_no_weight_decay_on_norms_and_biases_resnet(depth):
    model = fresh("resnet18")
    models.freeze(model, "resnet18", depth)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = group_names(model, models.parameter_groups(model, 0.05))
    # convolution and linear weights (the matrices) decay; BatchNorm's scale and shift and every bias do not
    assert groups[0.05] == {name for name, p in trainable.items() if p.ndim > 1}
    assert groups[0.0] == {name for name, p in trainable.items() if p.ndim == 1}
    assert {"layer3.0.bn1.weight", "layer3.0.bn1.bias"} <= groups[0.0]
    assert ("conv1.weight" in groups[0.05]) == ("bn1.weight" in groups[0.0]) == (depth == 0)  # frozen: in neither
    assert {"fc.bias", "layer4.0.downsample.1.weight"} <= groups[0.0]
    assert {"fc.weight", "layer4.0.downsample.0.weight", "layer3.1.conv2.weight"} <= groups[0.05]


def test_no_weight_decay_on_vit_embeddings_norms_and_biases():
    model = fresh("vit_b_32")
    models.freeze(model, "vit_b_32", 0)
    groups = group_names(model, models.parameter_groups(model, 0.05))
    every = dict(model.named_parameters())
    kept = {"class_token", "encoder.pos_embedding"} | {n for n in every if n.endswith("bias") or ".ln" in n}
    assert {"encoder.ln.weight", "encoder.layers.encoder_layer_0.ln_1.weight", "conv_proj.bias"} <= kept
    assert groups[0.0] == kept
    assert groups[0.05] == set(every) - kept
    assert {"conv_proj.weight", "encoder.layers.encoder_layer_3.self_attention.in_proj_weight"} <= groups[0.05]
    # a feature extractor trains the head alone
    models.freeze(model, "vit_b_32", "all")
    assert group_names(model, models.parameter_groups(model, 0.05)) == {
        0.05: {"heads.head.weight"},
        0.0: {"heads.head.bias"},
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_decays_what_parameter_groups_says(optimizer):
    from tlray.spec import TrainSpec
    from tlray.training.setup import make_optimizer

    model = fresh("resnet18")
    models.freeze(model, "resnet18", 4)  # layer4 and fc train
    train = TrainSpec(optimizer=optimizer, weight_decay=0.05, lr=0.1)
    made = make_optimizer(model, train)
    assert group_names(model, made.param_groups) == group_names(model, models.parameter_groups(model, 0.05))
    assert all(group["lr"] == 0.1 for group in made.param_groups)
    assert numel(p for group in made.param_groups for p in group["params"]) == numel(models.trainable_parameters(model))
    listed = make_optimizer(models.trainable_parameters(model), train)  # no names: every parameter decays
    assert [group["weight_decay"] for group in listed.param_groups] == [0.05]
