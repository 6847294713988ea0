"""tlray.models.freeze: freezing (params, optimizer, BatchNorm, DDP) and weight-decay parameter groups."""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
from torch import nn

from tlray.archs import ModelError
from tlray.models.freeze import FreezeSummary, freeze, parameter_groups, trainable_parameters
from tlray.models.layout import backbone_block_names, head_module

from model_cases import EXPECTED, NUM_CLASSES, ONE_PER_FAMILY, fresh

# head-side layers a feature extractor freezes too: its prefix ends where the head reads (ViT: the class token
# after the final LayerNorm), so the cache stores one vector per image
FEATURE_EXTRACTOR_NECK = {"vit_b_32": ["encoder.ln"]}
WITH_BATCHNORM = ["resnet18", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf"]


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


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_counts_at_every_depth(arch):
    blocks, head, head_side = EXPECTED[arch]
    model = fresh(arch)
    total = numel(model.parameters())
    assert model.get_submodule(head).out_features == NUM_CLASSES
    for depth in [*range(len(blocks) + 1), "all"]:
        d = len(blocks) if depth == "all" else depth
        summary = freeze(model, arch, depth)
        neck = FEATURE_EXTRACTOR_NECK.get(arch, []) if d == len(blocks) else []
        frozen = numel(
            p for path in [*(path for block in blocks[:d] for path in block), *neck] for p in params_at(model, path)
        )
        assert summary == FreezeSummary(d, len(blocks), backbone_block_names(arch)[:d], total - frozen, frozen)
        assert numel(p for p in model.parameters() if not p.requires_grad) == frozen
        assert numel(trainable_parameters(model)) == total - frozen
    # "all": exactly the head-side layers after the neck remain trainable
    trained_side = [path for path in head_side if path not in FEATURE_EXTRACTOR_NECK.get(arch, [])]
    assert numel(trainable_parameters(model)) == numel(p for path in trained_side for p in params_at(model, path))
    assert all(p.requires_grad for path in trained_side for p in params_at(model, path))
    freeze(model, arch, len(blocks) - 1)  # a partial depth trains every head-side layer
    assert all(p.requires_grad for path in head_side for p in params_at(model, path))


def test_freeze_logs_counts(caplog):
    model = fresh("resnet18")
    with caplog.at_level("INFO", logger="tlray"):
        s = freeze(model, "resnet18", 2)
    assert f"trainable {s.trainable_params} / frozen {s.frozen_params} parameters" in caplog.text
    assert "freeze_depth 2 of 5: blocks stem, layer1" in caplog.text


def test_freeze_rejects_bad_batchnorm_and_depth():
    model = fresh("resnet18")
    with pytest.raises(ModelError, match="^model.batchnorm"):
        freeze(model, "resnet18", 1, batchnorm="sometimes")
    with pytest.raises(ModelError, match="^model.freeze_depth"):
        freeze(model, "resnet18", 9)


@pytest.mark.parametrize("arch", ONE_PER_FAMILY + ["mobilenet_v2"])
def test_sgd_step_leaves_frozen_parameters_untouched(arch):
    blocks, _, _ = EXPECTED[arch]
    model = fresh(arch)
    depth = len(blocks) // 2
    freeze(model, arch, depth)
    frozen = [p for block in blocks[:depth] for path in block for p in params_at(model, path)]
    before = [p.detach().clone() for p in frozen]
    trainable = trainable_parameters(model)
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
    freeze(model, arch, depth, batchnorm="frozen")
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
    freeze(model, arch, 2, batchnorm="train")
    frozen_bns = batchnorms(model, [p for b in blocks[:2] for p in b])
    before = bn_state(frozen_bns)
    model.train()
    model(batch_for(arch))
    assert not same(bn_state(frozen_bns), before)
    assert all(not p.requires_grad for bn in frozen_bns for p in bn.parameters())


def test_refreezing_shallower_releases_batchnorm():
    model = fresh("resnet18")
    freeze(model, "resnet18", 3)
    freeze(model, "resnet18", 1)
    model.train()
    assert model.layer2[0].bn1.training and not model.bn1.training
    assert all(p.requires_grad for p in model.layer2.parameters())


def test_freeze_refuses_a_ddp_wrapped_model(process_group):
    ddp = nn.parallel.DistributedDataParallel(fresh("resnet18"))
    with pytest.raises(ModelError, match="^model.freeze_depth: .*DistributedDataParallel"):
        freeze(ddp, "resnet18", 2)
    assert head_module(ddp, "resnet18").out_features == NUM_CLASSES


def test_frozen_model_trains_under_ddp(process_group):
    model = fresh("resnet18")
    freeze(model, "resnet18", 3)  # before wrapping, as prepare_model would be called after
    frozen = [p for path in ["conv1", "bn1", "layer1", "layer2"] for p in params_at(model, path)]
    before = [p.detach().clone() for p in frozen]
    bns = batchnorms(model, ["bn1", "layer1", "layer2"])
    bn_before = bn_state(bns)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trainable_parameters(ddp), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ddp.train()
    x, y = batch_for("resnet18"), torch.tensor([0, 1])
    for _ in range(2):  # the second step is where a wrong freeze fails ("Expected to have finished reduction")
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    assert same(bn_state(bns), bn_before)


# ---------------------------------------------------------------- weight decay


def group_names(model: nn.Module, groups: list[dict]) -> dict[float, set[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in groups}


@pytest.mark.parametrize("depth", [0, 2])
def test_no_weight_decay_on_norms_and_biases_resnet(depth):
    model = fresh("resnet18")
    freeze(model, "resnet18", depth)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = group_names(model, parameter_groups(model, 0.05))
    # convolution and linear weights (the matrices) decay; BatchNorm's scale and shift and every bias do not
    assert groups[0.05] == {name for name, p in trainable.items() if p.ndim > 1}
    assert groups[0.0] == {name for name, p in trainable.items() if p.ndim == 1}
    assert {"layer3.0.bn1.weight", "layer3.0.bn1.bias"} <= groups[0.0]
    assert ("conv1.weight" in groups[0.05]) == ("bn1.weight" in groups[0.0]) == (depth == 0)  # frozen: in neither
    assert {"fc.bias", "layer4.0.downsample.1.weight"} <= groups[0.0]
    assert {"fc.weight", "layer4.0.downsample.0.weight", "layer3.1.conv2.weight"} <= groups[0.05]


def test_no_weight_decay_on_vit_embeddings_norms_and_biases():
    model = fresh("vit_b_32")
    freeze(model, "vit_b_32", 0)
    groups = group_names(model, parameter_groups(model, 0.05))
    every = dict(model.named_parameters())
    kept = {"class_token", "encoder.pos_embedding"} | {n for n in every if n.endswith("bias") or ".ln" in n}
    assert {"encoder.ln.weight", "encoder.layers.encoder_layer_0.ln_1.weight", "conv_proj.bias"} <= kept
    assert groups[0.0] == kept
    assert groups[0.05] == set(every) - kept
    assert {"conv_proj.weight", "encoder.layers.encoder_layer_3.self_attention.in_proj_weight"} <= groups[0.05]
    # a feature extractor trains the head alone
    freeze(model, "vit_b_32", "all")
    assert group_names(model, parameter_groups(model, 0.05)) == {
        0.05: {"heads.head.weight"},
        0.0: {"heads.head.bias"},
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_decays_what_parameter_groups_says(optimizer):
    from tlray.spec import TrainSpec
    from tlray.training.setup import make_optimizer

    model = fresh("resnet18")
    freeze(model, "resnet18", 4)  # layer4 and fc train
    train = TrainSpec(optimizer=optimizer, weight_decay=0.05, lr=0.1)
    made = make_optimizer(model, train)
    assert group_names(model, made.param_groups) == group_names(model, parameter_groups(model, 0.05))
    assert all(group["lr"] == 0.1 for group in made.param_groups)
    assert numel(p for group in made.param_groups for p in group["params"]) == numel(trainable_parameters(model))
    listed = make_optimizer(trainable_parameters(model), train)  # no names: every parameter decays
    assert [group["weight_decay"] for group in listed.param_groups] == [0.05]


def test_layer_lr_decay_counts_blocks_from_the_head_and_vits_stem_parameters_are_its_first_block():
    from tlray.models.freeze import layer_lr_scales, trainable_at

    model = fresh("vit_b_32")  # blocks: stem (conv_proj, class_token, encoder.pos_embedding), encoder_layer_0..11
    freeze(model, "vit_b_32", 0)
    scale = layer_lr_scales("vit_b_32", 0.5)
    assert scale("heads.head.weight") == scale("encoder.ln.weight") == 1.0  # the head side
    assert scale("encoder.layers.encoder_layer_11.mlp.0.weight") == 0.5
    assert scale("encoder.layers.encoder_layer_0.ln_1.bias") == 0.5**12
    assert scale("class_token") == scale("encoder.pos_embedding") == scale("conv_proj.weight") == 0.5**13
    groups = parameter_groups(model, 0.05, scale)
    assert [g["lr_scale"] for g in groups[:4]] == [1.0, 1.0, 0.5, 0.5]  # the head's first, decayed before kept
    assert numel(p for g in groups for p in g["params"]) == numel(model.parameters())
    # unfreezing from `all` adds the last block and the final LayerNorm that the feature extractor froze
    names = {id(p): n for n, p in model.named_parameters()}
    before = {id(p) for p in trainable_at(model, "vit_b_32", 13)}
    gained = {names[id(p)] for p in trainable_at(model, "vit_b_32", 12) if id(p) not in before}
    assert gained == {n for n in names.values() if n.startswith(("encoder.layers.encoder_layer_11.", "encoder.ln."))}
    assert "encoder.ln.weight" in gained
