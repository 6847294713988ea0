"""Faults injected into a real two-node Ray cluster, the data and the output in S3 (moto on 127.0.0.1).

One cluster serves the module (ray.cluster_utils.Cluster: a head and a worker node on this machine, 2 CPUs
each); each run is a `tlray` driver joined to it through RAY_ADDRESS, or a `ray job submit` to its job API.
Every fault is compared with one undisturbed run of the same spec, data and seed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tlray.artifacts.export import run_uri
from tlray.data.index import build_index
from tlray.io import checkpoints, storage
from tlray.k8s import manifests as k8s
from tlray.models.build import build_model
from tlray.spec import load_spec

from conftest import ROOT, Driver, spec_dict, write_image_folder, write_spec
from s3_fixtures import free_port, isolate_aws, raw_client, upload_tree

pytestmark = pytest.mark.slow

EPOCHS = 6
# small checkpoints (about 9 MiB with the optimizer's state): moto serves a GET at a few MB/s
ARCH = "mobilenet_v3_small"
# After losing a node the group keeps its size (scaling.num_workers is part of the run's identity): the 2 workers
# restart on the head node, so the data order, the ranks' random streams and the DDP sums are those of the
# undisturbed run. What differs is the torch threads per worker (2 -> 1, a node's CPUs shared by two workers), which
# may reorder float sums inside a convolution. Measured gap: 0.0 on every metric; the bound is float32 noise over
# 6 epochs, as for the same-node restart.
NODE_LOSS_TOLERANCE = 1e-4


@dataclass
class TwoNodes:
    cluster: object  # ray.cluster_utils.Cluster
    worker: object  # its worker node
    job_api: str  # http://127.0.0.1:<dashboard port>


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A head and a worker node, all on 127.0.0.1; every Ray process has the loopback S3's dummy credentials."""
    from ray.cluster_utils import Cluster

    from tlray.io import s3

    with pytest.MonkeyPatch.context() as patch:
        empty = tmp_path_factory.mktemp("aws") / "empty"
        empty.write_text("")
        isolate_aws(patch, empty)
        s3.clear_client_cache()
        # a submitted job's entrypoint (`tlray train job.yaml`) runs with the PATH the cluster started with
        patch.setenv("PATH", f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
        dashboard = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
            },
        )
        try:
            worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
            patch.setenv("RAY_ADDRESS", cluster.address)  # every tlray driver below joins this cluster
            yield TwoNodes(cluster, worker, f"http://127.0.0.1:{dashboard}")
        finally:
            cluster.shutdown()
            s3.clear_client_cache()


@pytest.fixture(scope="module")
def fault_data(two_nodes, s3_server, tmp_path_factory):
    """Images and stand-in pretrained weights in one bucket, shared by the module's runs."""
    bucket = "tlray-faults"
    raw_client(s3_server).create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("fault-data")
    upload_tree(s3_server, bucket, "images/", write_image_folder(root / "images", classes=3, per_class=24, size=24))
    torch.manual_seed(0)
    buffer = root / "weights.pt"
    torch.save(build_model(ARCH, None, 1000).state_dict(), buffer)
    raw_client(s3_server).put_object(Bucket=bucket, Key="weights.pt", Body=buffer.read_bytes())
    return bucket


def fault_spec(folder: Path, endpoint: str, bucket: str, output: str) -> Path:
    """Two workers, one per node (spread), one worker failure recovered; output under s3://bucket/<output>."""
    spec = spec_dict(
        f"s3://{bucket}/images",
        f"s3://{bucket}/{output}",
        model={"arch": ARCH, "weights": f"s3://{bucket}/weights.pt", "mode": "partial", "freeze_depth": 4},
        # no frozen-prefix cache: every epoch decodes its images, so a fault lands inside one, not between two
        train={"epochs": EPOCHS, "batch_size": 4, "lr": 0.003, "warmup_epochs": 0, "cache": "off"},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread", "max_failures": 1},
    )
    spec["dataset"]["endpoint_url"] = endpoint
    folder.mkdir(parents=True, exist_ok=True)
    return write_spec(folder / "job.yaml", spec)


def run_of(spec_path: Path) -> str:
    spec = load_spec(spec_path)
    return run_uri(spec, build_index(spec.dataset))


def history_of(spec_path: Path, endpoint: str) -> list[dict]:
    history = storage.read_json(f"{run_of(spec_path)}/metrics.json", endpoint)["history"]
    assert isinstance(history, list), history
    return history


def train_worker_pids() -> list[int]:
    """The processes of Ray Train's workers on this machine (Ray titles them ray::RayTrainWorker...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def undisturbed(two_nodes, fault_data, s3_server, tmp_path_factory):
    """The reference run: `ray job submit` of the RayJob manifest's entrypoint to the two-node cluster."""
    folder = tmp_path_factory.mktemp("undisturbed")
    spec_path = fault_spec(folder, s3_server, fault_data, "undisturbed")
    working_dir = folder / "submit"
    working_dir.mkdir()
    (working_dir / k8s.SPEC_FILE).write_text(spec_path.read_text())  # what the RayJob's ConfigMap mount holds
    spec = load_spec(spec_path)
    (rayjob,) = [o for o in k8s.render(spec, spec_path.read_text(), "tlray:test") if o["kind"] == "RayJob"]
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": two_nodes.job_api}
    env.pop("RAY_ADDRESS")  # the job API's address, not the cluster's
    submitted = subprocess.run(
        ["ray", "job", "submit", "--working-dir", str(working_dir), "--", *shlex.split(rayjob["spec"]["entrypoint"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and "succeeded" in output, output[-4000:]
    assert "2 CPU worker(s) on 2 node(s)" in output, output[-4000:]  # one worker per node
    return spec_path, output


def test_job_submitted_to_two_nodes_trains_one_worker_per_node_and_publishes(undisturbed, s3_server):
    spec_path, output = undisturbed
    history = history_of(spec_path, s3_server)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert {(h["nodes"], h["resumes"]) for h in history} == {(2, 0)}
    run = run_of(spec_path)
    metadata = storage.read_json(f"{run}/metadata.json", s3_server)
    assert metadata["metrics"]["epoch"] >= 1 and storage.exists(f"{run}/model/model.pt2", s3_server)
    assert f"[tlray] model published to {run}/model" in output


def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint_and_ends_as_undisturbed(
    two_nodes, fault_data, undisturbed, s3_server, tmp_path
):
    spec_path = fault_spec(tmp_path, s3_server, fault_data, "worker-killed")
    driver = Driver("train", str(spec_path))
    driver.wait_for(rf"\[tlray\] epoch 1/{EPOCHS}")  # epoch 1 is checkpointed; epoch 2 starts
    victim = train_worker_pids()[-1]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    driver.wait_for(rf"\[tlray\] resuming after epoch \d of {EPOCHS}")
    driver.wait_for(rf"\[tlray\] epoch \d/{EPOCHS}")
    recovered = time.monotonic() - killed
    assert driver.finish() == 0, driver.output
    print(f"worker killed: first epoch after the restart ended {recovered:.1f} s after the kill")

    history = history_of(spec_path, s3_server)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    resumes = [h["resumes"] for h in history]  # the restart shows in the history
    resumed_at = resumes.index(1)
    assert 1 <= resumed_at < EPOCHS and resumes == [0] * resumed_at + [1] * (EPOCHS - resumed_at)
    # the same group size, data order, optimizer, schedule and random streams (tlray.training.rng): the same numbers
    assert_same_final_metrics(history, history_of(undisturbed[0], s3_server), tolerance=1e-4)


def test_losing_the_worker_node_mid_run_finishes_on_the_head_node(
    two_nodes, fault_data, undisturbed, s3_server, tmp_path
):
    spec_path = fault_spec(tmp_path, s3_server, fault_data, "node-lost")
    driver = Driver("train", str(spec_path))
    driver.wait_for(rf"\[tlray\] epoch 1/{EPOCHS}")
    lost = time.monotonic()
    two_nodes.cluster.remove_node(two_nodes.worker, allow_graceful=False)  # its raylet and workers, at once
    try:
        driver.wait_for(r"\[tlray\] 2 CPU worker\(s\) on 1 node\(s\)")
        driver.wait_for(rf"\[tlray\] epoch \d/{EPOCHS}")
        recovered = time.monotonic() - lost
        assert driver.finish() == 0, driver.output
    finally:
        two_nodes.worker = two_nodes.cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    print(f"worker node lost: first epoch on the head node alone ended {recovered:.1f} s after the loss")

    history = history_of(spec_path, s3_server)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[0]["nodes"] == 2 and history[-1]["nodes"] == 1 and history[-1]["resumes"] == 1
    assert_same_final_metrics(history, history_of(undisturbed[0], s3_server), tolerance=NODE_LOSS_TOLERANCE)


def test_stopped_drivers_resume_from_the_newest_complete_checkpoint_into_one_run(
    two_nodes, fault_data, s3_server, tmp_path
):
    spec_path = fault_spec(tmp_path, s3_server, fault_data, "driver-stopped")
    run = run_of(spec_path)

    # 1. SIGTERM (a Kubernetes preemption) right after epoch 1: out within the grace period, epoch 1 kept
    first = Driver("train", str(spec_path))
    first.wait_for(rf"\[tlray\] epoch 1/{EPOCHS}")
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.finish(timeout=60) == 143, first.output
    stopped_in = time.monotonic() - signalled
    assert stopped_in < 30 and "tlray: terminated (SIGTERM)" in first.output
    after_sigterm = newest_sealed(run, s3_server)
    assert 1 <= after_sigterm < EPOCHS - 1

    # 2. SIGKILL in the middle of the next epoch: no handler runs
    second = Driver("train", str(spec_path))
    second.wait_for(rf"\[tlray\] resuming after epoch {after_sigterm} of {EPOCHS}")
    second.wait_for(rf"\[tlray\] epoch {after_sigterm + 1}/{EPOCHS}")
    time.sleep(0.3)
    second.process.kill()
    second.finish(timeout=60)
    after_sigkill = newest_sealed(run, s3_server)
    assert after_sigterm < after_sigkill < EPOCHS

    # 3. and an upload cut off part-way after it: a newer folder whose state is short of its seal
    newer = f"{run}/train/{checkpoints.folder_name(after_sigkill)}"
    kept = f"{run}/train/{checkpoints.folder_name(after_sigkill - 1)}"
    state = storage.read_bytes(f"{kept}/{checkpoints.STATE_FILE}", s3_server)
    storage.write_bytes(
        f"{newer}/{checkpoints.SEAL_FILE}", storage.read_bytes(f"{kept}/sealed.json", s3_server), s3_server
    )
    storage.write_bytes(f"{newer}/{checkpoints.STATE_FILE}", state[: len(state) // 3], s3_server)

    third = Driver("train", str(spec_path))
    assert third.finish() == 0, third.output
    assert f"[tlray] resuming after epoch {after_sigkill} of {EPOCHS}" in third.output
    partial = f"{checkpoints.folder_name(after_sigkill)} (state.pt has {len(state) // 3} of {len(state)} bytes)"
    assert f"incomplete: {partial}" in third.output
    history = history_of(spec_path, s3_server)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # no epoch lost or run twice
    resumes = [0] * after_sigterm + [1] * (after_sigkill - after_sigterm) + [2] * (EPOCHS - after_sigkill)
    assert [h["resumes"] for h in history] == resumes
    runs = {key.split("/")[0] for key in storage.list_tree(f"s3://{fault_data}/driver-stopped/tiny/runs", s3_server)}
    assert runs == {run.rsplit("/", 1)[-1]}, "one run folder, resumed twice"
    print(f"driver SIGTERM: out in {stopped_in:.1f} s; kept epochs {after_sigterm}, then {after_sigkill} after SIGKILL")


def newest_sealed(run: str, endpoint: str) -> int:
    found = checkpoints.newest_complete(f"{run}/train", endpoint)
    return found.state["epoch"] + 1 if found else 0


def assert_same_final_metrics(history: list[dict], reference: list[dict], tolerance: float) -> None:
    """The final metrics of a disturbed run against the undisturbed run's, within `tolerance`."""
    last, expected = history[-1], reference[-1]
    gaps = {k: last[k] - expected[k] for k in ("val_loss", "val_accuracy", "train_loss")}
    print(f"final metrics minus the undisturbed run's: {gaps}")
    for key, gap in gaps.items():
        assert abs(gap) <= tolerance, f"{key}: {last[key]} against {expected[key]} undisturbed"


def test_a_node_that_cannot_see_a_local_path_stops_the_run_before_training(two_nodes, tmp_path, capsys):
    import ray

    from tlray.cli import main
    from tlray.errors import UserError
    from tlray.training import nodes

    data = write_image_folder(tmp_path / "images")
    torch.save(build_model("resnet18", None, 1000).state_dict(), tmp_path / "weights.pt")
    model = {"arch": "resnet18", "weights": str(tmp_path / "weights.pt"), "mode": "partial", "freeze_depth": 1}
    spec_path = write_spec(tmp_path / "job.yaml", spec_dict(str(data), str(tmp_path / "out"), model=model))
    spec = load_spec(spec_path)
    index = build_index(spec.dataset)
    ray.init(address=two_nodes.cluster.address)
    nodes.check_every_node_sees_local_paths(spec, index)  # two nodes on one machine: the same files

    # a third node in a mount namespace of its own, where this test's folder is an empty tmpfs (joined as
    # ray.cluster_utils joins its nodes: `ray start` refuses to join a cluster started this way)
    log = tmp_path.parent / f"{tmp_path.name}-hidden-node.log"
    join = JOIN_NODE.format(gcs_address=two_nodes.cluster.address)
    hidden = subprocess.Popen(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
            f"mount -t tmpfs hidden {tmp_path} && exec {sys.executable} -c '{join}'",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 3:
            assert hidden.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        (third,) = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in seen_nodes(two_nodes)]
        with pytest.raises(UserError) as error:
            nodes.check_every_node_sees_local_paths(spec, index)
        message = str(error.value)
        assert f"node 127.0.0.1 (Ray node {third['NodeID'][:12]}): dataset.uri: {data}/" in message
        assert f"model.weights: {tmp_path / 'weights.pt'} does not exist here" in message
        assert f"output.uri: {tmp_path / 'out'} is not the driver's folder here" in message
        assert len(message.splitlines()) == 5, "only the third node's three paths are named"
        assert "use s3:// URIs, or mount one shared filesystem at the same path on every node" in message
        assert not list((tmp_path / "out").glob(f"{nodes.MARKER_PREFIX}*")), "the marker is removed"

        ray.shutdown()
        assert main(["train", str(spec_path)]) == 2  # the command: exit 2 before any training
        err = capsys.readouterr().err
        assert "local paths of this run are not the same on all of them" in err and "Traceback" not in err
        assert not list((tmp_path / "out").rglob("epoch_*")), "nothing trained"
    finally:
        hidden.terminate()
        hidden.wait(timeout=60)


JOIN_NODE = """
import time, ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address="{gcs_address}", num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=150 * 1024**2,
    min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0,
)
params.dashboard_agent_listen_port = None
ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
time.sleep(3600)
"""


def seen_nodes(two_nodes: TwoNodes) -> set[str]:
    return {two_nodes.cluster.head_node.node_id, two_nodes.worker.node_id}


def test_on_two_nodes_the_frozen_blocks_run_about_once_per_image_in_all(two_nodes, fault_data, s3_server, tmp_path):
    """Each node keeps its own frozen-prefix cache: a rank meets the same share of rows every epoch, so over a run
    the two nodes together compute each image's activations about once (a global reshuffle per epoch would have
    each node compute almost all of them).

    The two nodes here share one filesystem; a cache folder of their own (TLRAY_CACHE_DIR in each node's
    environment, which its workers inherit) stands for the local disk of each machine: neither sees what the other
    computed. The head node keeps the session's folder; the worker node is swapped for one with a folder of its own.
    """
    import json

    from tlray.training import prefix_cache

    cluster = two_nodes.cluster
    worker_cache = tmp_path / "worker-node-cache"
    cluster.remove_node(two_nodes.worker)
    two_nodes.worker = cluster.add_node(
        num_cpus=2, node_ip_address="127.0.0.1", env_vars={prefix_cache.CACHE_DIR_ENV: str(worker_cache)}
    )
    head_cache = Path(os.environ[prefix_cache.CACHE_DIR_ENV])
    assert head_cache != worker_cache
    before = {p.name for p in head_cache.iterdir()} if head_cache.exists() else set()

    epochs = 5
    spec = spec_dict(
        f"s3://{fault_data}/images",
        f"s3://{fault_data}/cached-two-nodes",
        model={"arch": ARCH, "weights": f"s3://{fault_data}/weights.pt", "mode": "partial", "freeze_depth": 4},
        train={"epochs": epochs, "batch_size": 4, "lr": 0.003, "warmup_epochs": 0, "cache": "on"},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "placement": "spread"},
    )
    spec["dataset"]["endpoint_url"] = s3_server
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    driver = Driver("train", str(spec_path))
    assert driver.finish() == 0, driver.output
    output = "\n".join(driver.lines)
    assert "2 CPU worker(s) on 2 node(s)" in output, driver.output  # one worker per node
    assert "frozen-prefix cache: on for all 2 worker(s)" in output, driver.output

    index = build_index(load_spec(spec_path).dataset)
    rows = len(index.train) + len(index.val)
    history = history_of(spec_path, s3_server)
    computed = sum(h["feature_pass_images"] for h in history)
    print(f"two nodes, {epochs} epochs: {computed} activations computed for {rows} rows (train + val)")
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert computed <= 1.1 * rows
    assert history[0]["feature_pass_images"] > 0.8 * rows  # the first epoch computes most of them

    # each node holds one entry, its rank's share: about half the rows, not all of them
    for folder in (head_cache, worker_cache):
        (entry,) = [e for e in folder.iterdir() if e.is_dir() and e.name not in before]
        layout = json.loads((entry / "complete-layout").read_text())
        assert sum(layout["counts"].values()) <= rows // 2 + 1, layout
