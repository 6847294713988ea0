"""The frozen-prefix cache: when it is used, that it changes nothing but speed, and what its key covers.

The training runs share one local Ray (module scope) and a tiny dataset: ResNet-18 at 32 px,
more training rows than one batch and more than one batch per worker, two epochs, so epoch 2
reads rows that epoch 1's shuffle gave to the other worker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tlray.data.index import build_index
from tlray.data.pipeline import data_source
from tlray.models import build, freeze
from tlray.models import split as model_split
from tlray.plan import plan_run
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import JobSpec
from tlray.training import prefix_cache
from tlray.training.prefix_cache import decide
from tlray.training.trainer import load_checkpoint_state, make_trainer

from conftest import spec_dict, write_image_folder

GIB = 1024**3


@pytest.mark.parametrize(
    "setting, depth, augment, batchnorm, needed, free, expected",
    [
        ("auto", 3, False, "frozen", GIB, 9 * GIB, "on: 1.00 GiB of activations <= train.cache_budget_gb 2.00 GiB"),
        ("auto", 3, False, "frozen", 3 * GIB, 9 * GIB, "off: 3.00 GiB of activations > train.cache_budget_gb 2.00 GiB"),
        ("on", 3, False, "frozen", 3 * GIB, 9 * GIB, "on: 3.00 GiB of activations"),
        ("on", 3, False, "frozen", 3 * GIB, GIB, "off: 3.00 GiB of activations > 1.00 GiB free in /cache"),
        ("auto", 0, False, "frozen", 0, 9 * GIB, "off: nothing is frozen"),
        (
            "auto",
            3,
            True,
            "frozen",
            GIB,
            9 * GIB,
            "off: dataset.augment is on: every epoch crops anew, so the frozen output changes",
        ),
        (
            "auto",
            3,
            False,
            "train",
            GIB,
            9 * GIB,
            "off: model.batchnorm is train: the frozen blocks' statistics keep changing",
        ),
        ("off", 3, False, "frozen", GIB, 9 * GIB, "off: train.cache is off"),
    ],
)
def test_decide_says_why(monkeypatch, setting, depth, augment, batchnorm, needed, free, expected):
    monkeypatch.setenv(prefix_cache.CACHE_DIR_ENV, "/cache")
    use, why = decide(setting, depth, augment, batchnorm, needed, 2 * GIB, free)
    assert f"{'on' if use else 'off'}: {why}" == expected


# ---------------------------------------------------------------------------------------
# Training with and without the cache
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import os

    import ray

    session_cache = os.environ[prefix_cache.CACHE_DIR_ENV]
    os.environ[prefix_cache.CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("cache"))  # the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    os.environ[prefix_cache.CACHE_DIR_ENV] = session_cache


@pytest.fixture(autouse=True)
def _fresh_ray_per_test():  # this module shares one Ray (local_ray) instead of one per test
    yield


@pytest.fixture(scope="module")
def job(local_ray, tmp_path_factory):
    """(spec data, weights file, source): 120 images of 3 classes, 32 px; weights = a saved random ResNet-18."""
    root = tmp_path_factory.mktemp("job")
    images = write_image_folder(root / "images", classes=3, per_class=40, size=32, seed=7)
    torch.manual_seed(0)
    weights = root / "weights.pt"
    torch.save(build.build_model("resnet18", None, 1000).state_dict(), weights)
    spec = JobSpec.model_validate(
        spec_dict(
            str(images),
            str(root / "out"),
            model={"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": 1},
        )
    )
    index = build_index(spec.dataset)
    return (
        spec.model_dump(mode="json"),
        str(weights),
        data_source(index, spec.dataset, preprocessing_for("resnet18", 32)),
    )


def train(job, tmp_path: Path, name: str, depth, workers: int, cache: str) -> dict:
    spec_data, weights, source = job
    spec_data = {
        **spec_data,
        "model": {**spec_data["model"], "freeze_depth": depth},
        "train": {**spec_data["train"], "cache": cache},
        "scaling": {**spec_data["scaling"], "num_workers": workers, "cpus_per_worker": 0.5},  # a CPU left for Ray Data
    }
    spec = JobSpec.model_validate(spec_data)
    model = build.build_model(spec.model.arch, None, len(source.classes))
    result = make_trainer(plan_run(spec, source, str(tmp_path / "runs" / name), model)).fit()
    return load_checkpoint_state(result.checkpoint)


def empty_the_cache() -> None:
    import shutil

    for entry in prefix_cache.cache_root().iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def epoch_rows(source, seed: int, epoch: int, workers: int, batch: int) -> set[int]:
    from tlray.data import order

    rows, world = source.counts["train"], workers
    per_worker = batch * order.train_batches(rows, world, batch)[1]
    return {int(r) for rank in range(world) for r in order.train_rows(rows, seed, epoch, rank, world)[:per_worker]}


@pytest.mark.parametrize("depth, workers", [(2, 2), ("all", 1)])  # partial with two workers; the feature extractor
def test_cached_training_gives_the_uncached_weights(job, tmp_path, depth, workers):
    _, _, source = job
    empty_the_cache()
    uncached = train(job, tmp_path, "uncached", depth, workers, cache="off")
    cached = train(job, tmp_path, "cached", depth, workers, cache="on")

    for name, tensor in uncached["model"].items():
        torch.testing.assert_close(cached["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for plain, with_cache in zip(uncached["history"], cached["history"], strict=True):
        assert with_cache["val_accuracy"] == plain["val_accuracy"]
        assert with_cache["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert "feature_pass_images" not in uncached["history"][0]

    # each row's activations are computed once on the node, whichever worker met it first
    first, second = (epoch_rows(source, 0, epoch, workers, 8) for epoch in (0, 1))
    computed = [h["feature_pass_images"] for h in cached["history"]]
    assert computed == [len(first) + source.counts["val"], len(second - first)]


def test_frozen_blocks_build_no_graph_and_ddp_reduces_only_trained_gradients(tmp_path):
    """What the loop runs (setup.run_frozen, then the DDP-wrapped rest), counted op by op."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tlray.training.setup import run_frozen

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        torch.manual_seed(0)
        model = build.build_model("resnet18", None, 3)
        freeze.freeze(model, "resnet18", 3)  # stem, layer1, layer2 frozen; layer3, layer4, fc trained
        parts = model_split.split(model, "resnet18", 3)
        trained = DistributedDataParallel(parts.rest)
        reduced = []

        def count_and_pass(_, bucket):  # a comm hook: sees every gradient bucket DDP all-reduces
            reduced.append(bucket.buffer().numel())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        trained.register_comm_hook(None, count_and_pass)
        model.train()
        frozen_output = run_frozen(parts.prefix, preprocessing_for("resnet18", 64), torch.device("cpu"), None)
        images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        with torch.profiler.profile() as profile:
            features = frozen_output(images)
            trained(features).sum().backward()
    finally:
        dist.destroy_process_group()

    assert features.grad_fn is None and not features.requires_grad
    ops = [event.name for event in profile.events()]
    trained_convs = sum(isinstance(m, torch.nn.Conv2d) for m in [*model.layer3.modules(), *model.layer4.modules()])
    all_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert ops.count("aten::convolution_backward") == trained_convs == 10
    assert ops.count("aten::convolution") == all_convs == 20  # forward: every block once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(reduced) == trainable
    assert trainable == sum(p.numel() for m in (model.layer3, model.layer4, model.fc) for p in m.parameters())
    frozen_blocks = (model.conv1, model.bn1, model.layer1, model.layer2)
    assert all(not m.training for block in frozen_blocks for m in block.modules())  # BatchNorm statistics fixed
    assert all(m.training for m in model.layer3.modules())


# ---------------------------------------------------------------------------------------
# The key, and filling an entry
# ---------------------------------------------------------------------------------------
def test_the_key_changes_with_everything_the_activations_depend_on(job):
    spec_data, weights, source = job
    model = build.build_model("resnet18", weights, 3)
    prefix = model_split.split(model, "resnet18", 2).prefix
    key = prefix_cache.cache_key("resnet18", 2, prefix, source, "float32", "cpu None")
    assert key == prefix_cache.cache_key("resnet18", 2, prefix, source, "float32", "cpu None")

    other_weights = build.build_model("resnet18", weights, 3)
    with torch.no_grad():
        other_weights.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-3  # one frozen value, at the same file path
    spec = JobSpec.model_validate({**spec_data, "dataset": {**spec_data["dataset"], "val_fraction": 0.5}})
    resplit = data_source(build_index(spec.dataset), spec.dataset, source.preprocessing)
    variants = {
        "weights": (
            "resnet18",
            2,
            model_split.split(other_weights, "resnet18", 2).prefix,
            source,
            "float32",
            "cpu None",
        ),
        "cut": ("resnet18", 3, model_split.split(model, "resnet18", 3).prefix, source, "float32", "cpu None"),
        "preprocessing": (
            "resnet18",
            2,
            prefix,
            dataclasses.replace(source, preprocessing=preprocessing_for("resnet18", 48)),
            "float32",
            "cpu None",
        ),
        "dataset content": (
            "resnet18",
            2,
            prefix,
            dataclasses.replace(source, fingerprint="changed"),
            "float32",
            "cpu None",
        ),
        "rows": ("resnet18", 2, prefix, resplit, "float32", "cpu None"),
        "dtype": ("resnet18", 2, prefix, source, "bfloat16", "cpu None"),
        "compute": ("resnet18", 2, prefix, source, "float32", "cuda torch.bfloat16"),
    }
    keys = {name: prefix_cache.cache_key(*args) for name, args in variants.items()}
    assert key not in keys.values()
    assert len(set(keys.values())) == len(variants)


def test_an_entry_is_filled_once_and_read_by_every_worker_and_trial(job):
    from concurrent.futures import ThreadPoolExecutor

    from tlray.training.setup import run_frozen

    _, weights, source = job
    empty_the_cache()
    model = build.build_model("resnet18", weights, 3)
    freeze.freeze(model, "resnet18", "all")
    prefix = model_split.split(model, "resnet18", "all").prefix
    frozen = run_frozen(prefix, source.preprocessing, torch.device("cpu"), None)
    key = prefix_cache.cache_key("resnet18", 5, prefix, source, "bfloat16", "cpu None")
    rows = np.arange(0, source.counts["train"], 3)

    every_row = {"train": np.arange(source.counts["train"]), "val": np.arange(source.counts["val"])}
    name = prefix_cache.entry_name(key, every_row)

    def worker() -> prefix_cache.FrozenPrefixCache:
        entry = prefix_cache.open_entry(name, (512,), every_row, "bfloat16", budget=GIB)
        return prefix_cache.FrozenPrefixCache(
            entry.path, "bfloat16", every_row, entry.features, entry.labels, frozen, False, entry.lease
        )

    # two trials with the same share at once: one computes, the other waits for its lock and finds the rows there
    trials = [worker(), worker()]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda cache: cache.fill(source, {"train": rows}, 16, torch.device("cpu")), trials))
    assert sorted(cache.take_fill_stats()[0] for cache in trials) == [0, len(rows)]

    later = worker()  # another process or run: nothing left to compute for these rows
    batches = list(later.iter_batches(source, "train", rows[::-1], 16, torch.device("cpu")))
    assert later.take_fill_stats()[0] == 0
    decoded = {
        int(r): b for batch in iter_decoded(source, rows) for r, b in zip(batch["row"], batch["image"], strict=True)
    }
    expected = frozen(torch.stack([decoded[int(r)] for r in rows[::-1]])).to(torch.bfloat16).float()
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), expected, rtol=0, atol=0)
    assert torch.cat([b["label"] for b in batches]).tolist() == [int(source_labels(source)[r]) for r in rows[::-1]]
    remaining = np.setdiff1d(np.arange(source.counts["train"]), rows)
    assert np.array_equal(later.labels["train"][remaining], np.full(len(remaining), prefix_cache.UNFILLED))


def iter_decoded(source, rows):
    from tlray.data.pipeline import iter_batches

    return iter_batches(source, "train", rows, 16, torch.device("cpu"))


def source_labels(source) -> np.ndarray:
    from tlray.data.pipeline import key_tables

    return key_tables(source.tables)["train"].labels


# ---------------------------------------------------------------------------------------
# One decision for the worker group
# ---------------------------------------------------------------------------------------
class LocalTables:
    """Stands for the object-store reference of a DataSource's key tables (tlray.data.pipeline.key_tables)."""

    def hex(self) -> str:
        return "local-tables"


def local_source() -> object:
    from tlray.data import pipeline
    from tlray.data.index import KeyTable

    tables = {
        split: KeyTable.of([(f"class_{i % 3}/{i:03d}.png", i % 3) for i in range(count)])
        for split, count in (("train", 40), ("val", 12))
    }
    pipeline.LOADED_TABLES[LocalTables().hex()] = tables
    return pipeline.DataSource(
        root="/images",
        endpoint_url=None,
        classes=("class_0", "class_1", "class_2"),
        counts={"train": 40, "val": 12},
        fingerprint="f",
        tables=LocalTables(),
        preprocessing=preprocessing_for("resnet18", 32),
        augment=False,
        on_bad_image="skip",
        read_concurrency=4,
        read_retry_seconds=5,
    )


def decide_on_rank(rank: int, world: int, port: int, without_room: tuple[int, ...], folder: str) -> None:
    """One rank of a gloo group on 127.0.0.1: the real decision, then what the loop runs at an epoch's end."""
    import datetime
    import json
    import os

    import torch.distributed as dist

    from tlray.training import loop, setup

    os.environ[prefix_cache.CACHE_DIR_ENV] = f"{folder}/cache"
    if rank in without_room:  # this rank's node has no room: its free-space probe says so
        prefix_cache.free_bytes = lambda: 0
    said, collectives = [], []
    prefix_cache.say = said.append
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            collectives.append(_name)
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    # a short timeout: ranks that disagree fail here instead of hanging for the default 30 minutes
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        source = local_source()
        spec = JobSpec.model_validate(
            spec_dict(
                "/images",
                f"{folder}/out",
                model={"arch": "resnet18", "weights": f"{folder}/w.pt", "mode": "partial", "freeze_depth": 1},
                scaling={"num_workers": world},
            )
        )
        torch.manual_seed(0)
        model = build.build_model("resnet18", None, 3)
        freeze.freeze(model, "resnet18", 1)
        prefix = model_split.split(model, "resnet18", 1).prefix
        cpu = torch.device("cpu")
        frozen = setup.run_frozen(prefix, source.preprocessing, cpu, None)
        cache = prefix_cache.for_worker(spec, source, prefix, frozen, cpu, None, rank, world)
        if cache:  # as the loop does after an epoch: the fill statistics, summed over the group
            loop.all_reduce_sum(list(cache.take_fill_stats()), cpu)
        dist.barrier()  # stands for ray.train.report's barrier
    finally:
        dist.destroy_process_group()
    result = {"cached": cache is not None, "collectives": collectives, "said": said}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("without_room", [(), (1,), (0,)])
def test_ranks_that_disagree_about_room_take_one_path_and_run_the_same_collectives(tmp_path, without_room):
    import json

    import torch.multiprocessing as mp

    from s3_fixtures import free_port

    mp.spawn(decide_on_rank, args=(2, free_port(), without_room, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r["cached"] for r in ranks] == [not without_room] * 2
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    assert ranks[0]["collectives"] == ["all_reduce"] * (2 if not without_room else 1) + ["barrier"]
    decision = [line for line in ranks[0]["said"] if "for all 2 worker(s)" in line]
    if not without_room:
        assert decision == [decision[0]] and decision[0].startswith("frozen-prefix cache: on for all 2 worker(s)")
    elif without_room == (1,):  # rank 0 could: it names the rank that could not, which says why
        assert decision == [
            "frozen-prefix cache: off for all 2 worker(s) (rank(s) 1 cannot use it on their node; "
            "every rank runs the frozen blocks)"
        ]
        (reason,) = ranks[1]["said"]
        assert reason.startswith("frozen-prefix cache: rank 1: off (") and "0.0 MiB free in" in reason
    else:
        (line,) = decision
        assert line.startswith("frozen-prefix cache: off for all 2 worker(s) (") and "0.0 MiB free in" in line


# ---------------------------------------------------------------------------------------
# A node's disk: entries allocated in full, one budget for all of them
# ---------------------------------------------------------------------------------------
def test_an_entry_is_allocated_in_full_when_it_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv(prefix_cache.CACHE_DIR_ENV, str(tmp_path))
    rows = {"train": np.arange(0, 300, 2), "val": np.arange(40)}
    entry = prefix_cache.open_entry("entry", (64, 4, 4), rows, "float32", budget=GIB)
    for split, held in rows.items():
        features = entry.path / f"{split}.npy"
        assert features.stat().st_blocks * 512 >= len(held) * 64 * 4 * 4 * 4  # no holes: every block on the disk
        assert entry.features[split].shape == (len(held), 64, 4, 4)
        assert (entry.labels[split] == prefix_cache.UNFILLED).all()
    needed = prefix_cache.entry_bytes((64, 4, 4), {"train": 150, "val": 40}, "float32")
    assert prefix_cache.folder_bytes(entry.path) >= needed


FULL_DISK = """
import sys
import numpy as np
from tlray.training import prefix_cache
prefix_cache.disk_free = lambda root: 10**12  # the disk fills after the check (another process writes meanwhile)
try:
    prefix_cache.open_entry("entry", (1024,), {"train": np.arange(1000), "val": np.arange(10)}, "float32", 10**12)
except prefix_cache.NoRoom as exc:
    print(exc)
"""


def test_a_full_disk_is_a_refusal_naming_the_cache_dir_and_leaves_no_entry(tmp_path):
    import os
    import subprocess
    import sys

    # a 1 MiB disk of its own (a tmpfs in a private mount namespace) for a 4 MiB entry
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, prefix_cache.CACHE_DIR_ENV: str(disk)}
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
            f"mount -t tmpfs -o size=1m full {disk} && {sys.executable} -c '{FULL_DISK}' && ls -A {disk}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    message, *left = done.stdout.splitlines()
    assert message == f"cannot store 4.0 MiB in {disk} ($TLRAY_CACHE_DIR): No space left on device", done.stderr
    assert left == [".node.lock"], "the half-made entry is removed"


def test_one_budget_holds_every_entry_on_the_node_and_unused_ones_make_room(tmp_path, monkeypatch):
    monkeypatch.setenv(prefix_cache.CACHE_DIR_ENV, str(tmp_path))
    rows = {"train": np.arange(600), "val": np.arange(40)}  # 640 rows x 1 KiB: 0.6 MiB with the labels
    budget = 1024**2

    first = prefix_cache.open_entry("trial-a", (256,), rows, "float32", budget)
    with pytest.raises(prefix_cache.NoRoom, match=r"> train.cache_budget_gb 1.0 MiB, with 0.6 MiB in entries in use"):
        prefix_cache.open_entry("trial-b", (256,), rows, "float32", budget)  # another trial at the same time
    assert not (tmp_path / "trial-b").exists()
    again = prefix_cache.open_entry("trial-a", (256,), rows, "float32", budget)  # the same entry: no new room
    assert again.path == first.path

    first.close()
    again.close()  # trial a is over: its entry is the oldest unused one, removed to make room
    second = prefix_cache.open_entry("trial-b", (256,), rows, "float32", budget)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["trial-b"]
    assert prefix_cache.folder_bytes(second.path) <= budget
