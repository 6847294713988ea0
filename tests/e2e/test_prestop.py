"""The Ray head's preStop hook, run for real: a local Ray head (`ray start --head`, as in the pod) in a PID
namespace of its own, as a container has; the RayJob's own entrypoint submitted with `ray job submit`; then
the hook's command from the rendered manifest run as the kubelet runs it, an exec into that namespace
(`nsenter`), waited for. The hook sees only the head's processes, as in a pod, and never another tlray on
this machine. The driver must exit 143 with its last sealed epoch kept, and submitting the same job again
must resume from it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlray import prestop
from tlray.artifacts.export import run_uri
from tlray.data.index import build_index
from tlray.io import checkpoints
from tlray.k8s import manifests as k8s
from tlray.spec import load_spec

from conftest import ROOT, spec_dict, write_image_folder, write_spec
from s3_fixtures import free_port

EPOCHS = 8  # the stop takes 2-4 of these small epochs when the machine is idle: keep room after it


@pytest.mark.parametrize(
    ("argv", "is_run"),
    [
        (["/home/ray/anaconda3/bin/python", "/home/ray/anaconda3/bin/tlray", "train", "job.yaml"], True),
        (["python", "-m", "tlray", "tune", "job.yaml", "--if-data-changed"], True),
        (["/bin/sh", "-c", "tlray train job.yaml"], False),  # the job supervisor's shell reports the exit code
        (["python", "-m", "tlray", "launch", "pets-template"], False),
        (["python", "-m", "tlray.prestop", "--wait", "90"], False),
        (["python", "/usr/bin/tlray", "validate", "job.yaml"], False),
        (["ray::RayTrainWorker"], False),
    ],
)
def test_the_hook_finds_tlray_drivers_only(argv, is_run):
    assert prestop.is_tlray_run(argv) is is_run


def test_the_hook_does_nothing_without_a_driver(tmp_path):
    alone = subprocess.run(
        [*CONTAINER, *k8s.PRESTOP_COMMAND[:-1], "1"], env=head_environment(tmp_path), capture_output=True, text=True
    )
    assert alone.returncode == 0 and "[tlray] preStop: no tlray driver running" in alone.stdout, alone


# A container's view of processes: a PID namespace with its own /proc (root only, as on CI)
CONTAINER = ("unshare", "--pid", "--fork", "--mount-proc")


class DriverLog:
    """The job driver's log file on the head, read as it grows (`ray job logs --follow` polls and lags
    by seconds, long enough for a small run to finish before the hook would run)."""

    def __init__(self, path: Path):
        self.path, self.lines, self._offset = path, [], 0

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.path.exists():
                with self.path.open() as log:
                    log.seek(self._offset)
                    fresh = log.read()
                complete = fresh[: fresh.rfind("\n") + 1]  # whole lines only
                self._offset += len(complete.encode())
                for line in complete.splitlines():
                    self.lines.append(line)
                    if re.search(pattern, line):
                        return
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.path} within {timeout:.0f} s:\n" + "\n".join(self.lines[-40:]))


def head_environment(tmp_path: Path) -> dict:
    """The head container's environment: tlray on PATH (this checkout first), usage stats off, token auth."""
    return {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }


def ray(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(420)  # measured: 235 s with another suite on the machine
def test_prestop_stops_the_driver_which_keeps_its_last_sealed_epoch_and_resumes(tmp_path):
    images = write_image_folder(tmp_path / "images", classes=3, per_class=8, size=16)
    model = {"arch": "mobilenet_v3_small", "weights": "none", "mode": "architecture"}  # small: a quick epoch
    train = {"epochs": EPOCHS, "batch_size": 8, "lr": 0.003}
    spec = spec_dict(str(images), str(tmp_path / "out"), model=model, train=train)
    submit = tmp_path / "submit"
    submit.mkdir()
    spec_path = write_spec(submit / k8s.SPEC_FILE, spec)  # what the RayJob's ConfigMap mount holds
    loaded = load_spec(spec_path)
    (rayjob,) = [o for o in k8s.render(loaded, spec_path.read_text(), "tlray:test") if o["kind"] == "RayJob"]
    head_pod = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    hook = head_pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    entrypoint = shlex.split(rayjob["spec"]["entrypoint"])
    run = run_uri(loaded, build_index(loaded.dataset))

    env = head_environment(tmp_path)
    dashboard = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    temp_dir = Path(f"/tmp/tlps-{os.getpid()}")  # short: Ray's socket paths must fit 107 characters
    head = subprocess.Popen(
        [
            *CONTAINER,
            *("ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port())),
            *("--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2"),
            *("--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dir), "--disable-usage-stats"),
            # every port its own: another Ray on this machine may hold the defaults
            *("--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())),
            *("--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())),
            *("--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below by that group, nothing else
    )
    try:
        submit_when_ready(env, "--no-wait", "--submission-id", "first", "--working-dir", str(submit), "--", *entrypoint)
        logs = DriverLog(temp_dir / "session_latest" / "logs" / "job-driver-first.log")
        logs.wait_for(rf"\[tlray\] epoch 1/{EPOCHS}", timeout=120)

        # the kubelet: exec the hook in the head container, wait for it, then SIGTERM PID 1 (ignored by bash)
        exec_in_head = ("nsenter", "--target", str(container_init(head)), "--pid", "--mount", "--")
        started = time.monotonic()
        done = subprocess.run(
            [*exec_in_head, *hook], env=env, capture_output=True, text=True, timeout=k8s.TERMINATION_GRACE_SECONDS
        )
        stopped_in = time.monotonic() - started
        print(done.stdout.strip())
        assert done.returncode == 0 and "stopped in" in done.stdout, done.stdout + done.stderr
        assert stopped_in < k8s.PRESTOP_WAIT_SECONDS

        status = wait_for_status(
            env,
            "first",
            diagnose=lambda: (
                done.stdout
                + subprocess.run(
                    [*exec_in_head, "ps", "-eo", "pid,ppid,stat,args"], capture_output=True, text=True
                ).stdout
                + "\n".join(logs.lines[-15:])
            ),
        )
        assert "Job 'first' failed" in status and "failed with exit code 143" in status, status
        logs.wait_for(r"tlray: terminated \(SIGTERM\); every complete checkpoint is kept", timeout=30)
        kept = newest_sealed(run)
        assert 1 <= kept < EPOCHS, kept

        again = ray(env, "job", "submit", "--working-dir", str(submit), "--", *entrypoint, timeout=180)
        output = again.stdout + again.stderr
        assert again.returncode == 0 and "succeeded" in output, output[-3000:]
        assert f"[tlray] resuming after epoch {kept} of {EPOCHS}" in output, output[-3000:]
        assert newest_sealed(run) == EPOCHS
        print(f"preStop: driver stopped in {stopped_in:.1f} s, epoch {kept} of {EPOCHS} kept, resumed from it")
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def container_init(unshare: subprocess.Popen) -> int:
    """PID (outside) of the namespace's first process, `ray start`: the one to nsenter by."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
    assert children, "unshare has started its child"
    return int(children[0])


def submit_when_ready(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is not up yet (as KubeRay's submitter is)."""
    deadline = time.monotonic() + timeout
    while True:
        done = ray(env, "job", "submit", *args)
        if done.returncode == 0:
            return done
        waiting = "No available agent" in done.stderr or "Connection refused" in done.stderr + done.stdout
        assert waiting and time.monotonic() < deadline, (done.stdout + done.stderr)[-3000:]
        time.sleep(1)


def wait_for_status(env: dict, job: str, timeout: float = 60, diagnose=lambda: "") -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ray(env, "job", "status", job, timeout=30)
        text = status.stdout + status.stderr
        if any(f"Job '{job}' {end}" in text for end in ("failed", "succeeded", "was stopped")):
            return text
        time.sleep(0.5)
    raise AssertionError(f"job {job} still running {timeout:.0f} s after the preStop hook returned:\n{diagnose()}")


def newest_sealed(run: str) -> int:
    found = checkpoints.newest_complete(f"{run}/train", None)
    return found.state["epoch"] + 1 if found else 0


def stop_head(head: subprocess.Popen) -> None:
    """`ray start --block` stops the processes it started when signalled; its process group is ours alone."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    except ProcessLookupError:
        pass
