"""`tlray launch` (the scheduled CronJob's command) against a fake Kubernetes API on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tlray.cli import main
from tlray.k8s import launch
from tlray.k8s import manifests as k8s

NAMESPACE = "ml"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"
RAYCRONJOBS = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/raycronjobs"


class FakeApi(ThreadingHTTPServer):
    """Stores RayJobs as the API server would: names from generateName, server fields, label selectors."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.rayjobs: dict[str, dict] = {}
        self.raycronjobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None]] = []
        self.created = 0
        self.stall_reads = False  # answer the headers, then not the body: a read timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args):  # quiet
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.stall_reads:
            time.sleep(2)
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        self.server.requests.append(("GET", self.path, None))
        if url.path == RAYJOBS:
            selector = parse_qs(url.query).get("labelSelector", [""])[0]
            key, _, value = selector.partition("=")
            items = [j for j in self.server.rayjobs.values() if not key or j["metadata"]["labels"].get(key) == value]
            return self.reply(200, {"kind": "RayJobList", "items": items})
        name = url.path.rsplit("/", 1)[-1]
        if url.path.startswith(RAYJOBS + "/") and name in self.server.rayjobs:
            return self.reply(200, self.server.rayjobs[name])
        if url.path.startswith(RAYCRONJOBS + "/") and name in self.server.raycronjobs:
            return self.reply(200, self.server.raycronjobs[name])
        self.reply(404, {"kind": "Status", "message": f'{url.path.split("/")[-2]}.ray.io "{name}" not found'})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, json.loads(json.dumps(body))))  # as sent
        metadata = body["metadata"]
        if "resourceVersion" in metadata or "uid" in metadata:
            return self.reply(422, {"message": "resourceVersion should not be set on objects to be created"})
        self.server.created += 1
        metadata["name"] = metadata.pop("generateName") + f"x{self.server.created:04d}"
        metadata.update(
            uid=f"uid-{self.server.created}",
            resourceVersion="1",
            creationTimestamp=f"2026-11-2{self.server.created}T03:00:00Z",
        )
        self.server.rayjobs[metadata["name"]] = body
        self.reply(201, body)

    def do_DELETE(self):
        self.server.requests.append(("DELETE", self.path, None))
        if self.server.rayjobs.pop(self.path.rsplit("/", 1)[-1], None) is None:
            return self.reply(404, {"kind": "Status", "message": "not found"})
        self.reply(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def api():
    server = FakeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    template = k8s.ray_cron_job(
        "pets-template", "tlray:1", k8s.Sizing(2, 5, 1, 32), "tlray tune job.yaml", "0 3 * * 1", instance="pets"
    )
    template["spec"]["suspend"] = True
    template["metadata"].update(
        uid="u-template",
        resourceVersion="77",
        creationTimestamp="2026-01-01T00:00:00Z",
        generation=3,
        managedFields=[{"manager": "kubectl"}],
        finalizers=["example.com/keep"],
        ownerReferences=[{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u-x"}],
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    )
    server.raycronjobs["pets-template"] = template
    yield server
    server.shutdown()


def launch_cli(api: FakeApi, *extra: str) -> int:
    return main(["launch", "pets-template", "--namespace", NAMESPACE, "--api-server", api.url, *extra])


def test_launch_copies_the_suspended_template_into_a_new_rayjob(api, capsys):
    assert launch_cli(api) == 0
    (created,) = api.rayjobs.values()
    template = api.raycronjobs["pets-template"]
    assert created["kind"] == "RayJob" and created["metadata"]["name"].startswith("pets-")
    assert created["metadata"]["labels"][k8s.TEMPLATE_LABEL] == "pets-template"
    assert created["metadata"]["labels"]["app.kubernetes.io/instance"] == "pets"
    assert created["spec"] == template["spec"]["jobTemplate"] and "suspend" not in created["spec"]
    assert "created RayJob ml/pets-x0001 from pets-template" in capsys.readouterr().out


def test_launch_copies_no_finalizers_owners_or_server_fields(api):
    assert launch_cli(api) == 0
    (_, _, body), *_ = [r for r in api.requests if r[0] == "POST"]
    assert set(body["metadata"]) == {"generateName", "labels"}, "no finalizers, ownerReferences, uid, annotations..."


def test_launch_passes_the_kueue_queue_on_to_each_run(api):
    api.raycronjobs["pets-template"]["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] = "gpu"
    assert launch_cli(api) == 0
    (created,) = api.rayjobs.values()
    assert created["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "gpu"


def test_launch_skips_while_the_last_run_is_still_going(api, capsys):
    assert launch_cli(api) == 0
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Running"}
    assert launch_cli(api) == 0
    assert "pets-x0001 from pets-template still running; skipping" in capsys.readouterr().out
    assert sorted(api.rayjobs) == ["pets-x0001"]
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Complete"}
    assert launch_cli(api) == 0
    assert "pets-x0002" in api.rayjobs


def test_launch_prunes_finished_runs_beyond_keep(api):
    for _ in range(4):
        assert launch_cli(api, "--keep", "2") == 0
        for job in api.rayjobs.values():
            job["status"] = {"jobDeploymentStatus": "Failed"}
    runs = sorted(api.rayjobs)
    assert runs == ["pets-x0003", "pets-x0004"], "the newest two are kept"
    deletes = [path for method, path, _ in api.requests if method == "DELETE"]
    assert deletes == [f"{RAYJOBS}/pets-x0001", f"{RAYJOBS}/pets-x0002"]


def test_a_run_suspended_by_hand_does_not_block_the_schedule(api, capsys):
    assert launch_cli(api) == 0
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Suspended"}  # paused by hand: no queue
    assert launch_cli(api) == 0
    assert sorted(api.rayjobs) == ["pets-x0002"], "the new run replaces the suspended one"
    assert "deleted RayJob pets-x0001, suspended by hand: pets-x0002 replaces it" in capsys.readouterr().out
    api.rayjobs["pets-x0002"]["status"] = {"jobDeploymentStatus": "Initializing"}  # still going: wait
    assert launch_cli(api) == 0 and sorted(api.rayjobs) == ["pets-x0002"]


@pytest.mark.parametrize(
    ("held", "says"),
    [
        ({"labels": {k8s.KUEUE_QUEUE_LABEL: "gpu"}, "status": "Suspended"}, "pets-x0001 (LocalQueue gpu)"),
        # as Kueue's webhook creates it: spec.suspend set before KubeRay has written any status
        ({"labels": {k8s.KUEUE_QUEUE_LABEL: "gpu"}, "status": None}, "pets-x0001 (LocalQueue gpu)"),
        (
            {"managedBy": "kueue.x-k8s.io/multikueue", "status": "Suspended"},
            "pets-x0001 (managed by kueue.x-k8s.io/multikueue)",
        ),
    ],
    ids=["queue-label", "not-yet-reconciled", "multikueue"],
)
def test_a_run_kueue_holds_keeps_its_place_in_the_queue(api, capsys, held, says):
    assert launch_cli(api) == 0
    run = api.rayjobs["pets-x0001"]
    run["metadata"]["labels"].update(held.get("labels", {}))
    run["spec"]["suspend"] = True
    if "managedBy" in held:
        run["spec"]["managedBy"] = held["managedBy"]
    if held["status"]:
        run["status"] = {"jobDeploymentStatus": held["status"]}
    for _tick in range(3):  # steady contention: tick after tick, the queued run is left alone
        assert launch_cli(api) == 0
        out = capsys.readouterr().out
        assert f"{says} from pets-template still queued by Kueue; leaving it its place, skipping this run" in out
    assert sorted(api.rayjobs) == ["pets-x0001"]
    assert not [r for r in api.requests if r[0] == "DELETE"] and api.created == 1
    run["spec"]["suspend"] = False  # Kueue admits it; it runs, then finishes
    run["status"] = {"jobDeploymentStatus": "Complete"}
    assert launch_cli(api) == 0 and "pets-x0002" in api.rayjobs


def test_spec_overrides_are_the_entrypoints_set_values():
    entrypoint = "tlray tune job.yaml --if-data-changed --set scaling.use_gpu=false --set 'train.lr=0.01' --set=a.b=1"
    assert launch.spec_overrides(entrypoint) == ["scaling.use_gpu=false", "train.lr=0.01", "a.b=1"]
    assert launch.spec_overrides("tlray train job.yaml") == []


def test_launch_errors_name_the_problem(api, capsys):
    assert main(["launch", "nope", "--namespace", NAMESPACE, "--api-server", api.url]) == 2
    assert (
        'GET /apis/ray.io/v1/namespaces/ml/raycronjobs/nope: 404 raycronjobs.ray.io "nope" not found'
        in capsys.readouterr().err
    )
    assert main(["launch", "pets-template"]) == 2  # not in a pod, no --api-server
    assert "tlray launch runs inside a pod" in capsys.readouterr().err


def test_a_read_timeout_is_a_clear_error(api, capsys):
    api.stall_reads = True  # headers arrive, the body does not: urlopen returns, read() times out
    slow = launch.KubernetesApi(api.url, timeout=0.5)
    with pytest.raises(
        launch.UserError, match=r"GET /apis/ray.io/v1/namespaces/ml/raycronjobs/pets-template: no complete answer"
    ):
        launch.launch(slow, NAMESPACE, "pets-template")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("10.96.0.1", "https://10.96.0.1:443"),
        ("fd00:10:96::1", "https://[fd00:10:96::1]:443"),
        ("[fd00::1]", "https://[fd00::1]:443"),
    ],
)
def test_the_in_cluster_api_server_url_handles_ipv6(host, url, tmp_path, monkeypatch):
    assert launch.api_server_url(host, "443") == url
    (tmp_path / "token").write_text("t0ken\n")
    monkeypatch.setattr(launch, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(launch.ssl, "create_default_context", lambda cafile=None: None)  # no CA file here
    api = launch.KubernetesApi.in_cluster()
    assert api.server == url and api.token == "t0ken"


def test_the_rendered_cronjob_launches_its_own_template(capsys):
    from tlray.spec import load_spec

    from conftest import ROOT

    objects = k8s.render(load_spec(ROOT / "jobs" / "pets-s3.yaml"), "x: 1\n", "tlray:1", "cronjob")
    (template,) = [o for o in objects if o["kind"] == "RayCronJob"]
    (cron,) = [o for o in objects if o["kind"] == "CronJob"]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["tlray", "launch", template["metadata"]["name"]] and template["spec"]["suspend"] is True
    assert command[3:] == ["--if-data-changed", "--spec", "/etc/tlray/job.yaml"]
    assert launch.run_from_template(template)["metadata"]["generateName"] == "pets-"


# ---------------------------------------------------------------------------------------
# --if-data-changed in the launcher pod: the data check, run for real against S3 on loopback
# ---------------------------------------------------------------------------------------
def test_launcher_creates_no_rayjob_while_the_data_is_unchanged(api, s3_bucket, s3_env, tmp_path):
    """A scheduled tick on unchanged data: the launcher lists the data and reads latest.json in a fresh,
    small process (no torch, no Ray), and no RayJob, so no Ray cluster or GPU node, comes into being."""
    from test_light_cli import probe

    from tlray.artifacts import champion
    from tlray.data.index import build_index
    from tlray.io import storage
    from tlray.spec import load_spec

    from conftest import spec_dict, write_image_folder, write_spec
    from s3_fixtures import upload_tree

    upload_tree(s3_env, s3_bucket, "images/", write_image_folder(tmp_path / "images"))
    spec = spec_dict(f"s3://{s3_bucket}/elsewhere", f"s3://{s3_bucket}/runs")
    spec["dataset"]["endpoint_url"] = s3_env
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    # the run's entrypoint points the spec at the data: the launcher must read what the run will read
    template = api.raycronjobs["pets-template"]["spec"]["jobTemplate"]
    template["entrypoint"] = f"tlray train job.yaml --if-data-changed --set dataset.uri=s3://{s3_bucket}/images"
    loaded = load_spec(spec_path, [f"dataset.uri=s3://{s3_bucket}/images"])
    fingerprint = build_index(loaded.dataset).fingerprint
    pointer = champion.Pointer(
        f"{loaded.job_uri}/runs/r1", "r1", "val_accuracy", 0.9, fingerprint, "0" * 64, "2026-01-01T00:00:00Z"
    )
    storage.write_bytes(champion.latest_uri(loaded.job_uri), pointer.to_json(), s3_env)

    argv = ("launch", "pets-template", "--if-data-changed", "--spec", str(spec_path))
    argv += ("--namespace", NAMESPACE, "--api-server", api.url)
    same = probe(*argv)
    assert same["code"] == 0 and api.created == 0, same
    assert not {"torch", "torchvision", "ray"} & set(same["heavy"]), same  # the launcher pod has 0.5 GiB
    assert same["peak_mb"] < 300, same
    print(f"launcher data check: {same['peak_mb']:.0f} MB peak, {same['seconds']:.1f} s CPU")

    raw = (tmp_path / "images" / "class_0" / "000.png").read_bytes()
    from s3_fixtures import raw_client

    raw_client(s3_env).put_object(Bucket=s3_bucket, Key="images/class_1/new.png", Body=raw)  # new data
    changed = probe(*argv)
    assert changed["code"] == 0 and api.created == 1, changed
    (created,) = api.rayjobs.values()
    assert created["spec"]["entrypoint"] == template["entrypoint"]  # the run checks once more, in its driver


def test_launcher_data_check_prints_what_it_found(api, s3_bucket, s3_env, tmp_path, capsys):
    from tlray.artifacts import champion
    from tlray.data.index import build_index
    from tlray.io import storage
    from tlray.spec import load_spec

    from conftest import spec_dict, write_image_folder, write_spec
    from s3_fixtures import upload_tree

    upload_tree(s3_env, s3_bucket, "images/", write_image_folder(tmp_path / "images"))
    spec = spec_dict(f"s3://{s3_bucket}/images", f"s3://{s3_bucket}/runs")
    spec["dataset"]["endpoint_url"] = s3_env
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    assert launch_cli(api, "--if-data-changed", "--spec", str(spec_path)) == 0
    assert api.created == 1, "no champion yet: the first run trains"
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Complete"}
    loaded = load_spec(spec_path)
    fingerprint = build_index(loaded.dataset).fingerprint
    pointer = champion.Pointer("s3://x/r1", "r1", "val_accuracy", 0.9, fingerprint, "0" * 64, "2026-01-01T00:00:00Z")
    storage.write_bytes(champion.latest_uri(loaded.job_uri), pointer.to_json(), s3_env)
    capsys.readouterr()
    assert launch_cli(api, "--if-data-changed", "--spec", str(spec_path)) == 0
    out = capsys.readouterr().out
    assert api.created == 1 and "[tlray] dataset: 3 classes" in out
    assert f"dataset unchanged since the champion r1 (fingerprint {fingerprint[:12]})" in out
