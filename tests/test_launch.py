"""`tlray launch` (the scheduled CronJob's command) against a fake Kubernetes API on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tlray import k8s, launch
from tlray.cli import main

NAMESPACE = "ml"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"


class FakeApi(ThreadingHTTPServer):
    """Stores RayJobs as the API server would: names from generateName, server fields, label selectors."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.rayjobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None]] = []
        self.created = 0

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
        self.reply(404, {"kind": "Status", "message": f'rayjobs.ray.io "{name}" not found'})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, body))
        metadata = body["metadata"]
        if "resourceVersion" in metadata or "uid" in metadata:
            return self.reply(422, {"message": "resourceVersion should not be set on objects to be created"})
        self.server.created += 1
        metadata["name"] = metadata.pop("generateName") + f"x{self.server.created:04d}"
        metadata.update(uid=f"uid-{self.server.created}", resourceVersion="1", creationTimestamp=f"2026-11-2{self.server.created}T03:00:00Z")
        self.server.rayjobs[metadata["name"]] = body
        self.reply(201, body)

    def do_DELETE(self):
        self.server.requests.append(("DELETE", self.path, None))
        self.server.rayjobs.pop(self.path.rsplit("/", 1)[-1])
        self.reply(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def api():
    server = FakeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    job = k8s.ray_job("pets-template", "tlray:1", k8s.Sizing(2, 5, 1, 32), "tlray tune job.yaml", instance="pets")
    job["spec"]["suspend"] = True
    job["metadata"].update(uid="u-template", resourceVersion="77", creationTimestamp="2026-01-01T00:00:00Z",
                           managedFields=[{"manager": "kubectl"}],
                           annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    server.rayjobs["pets-template"] = job
    yield server
    server.shutdown()


def launch_cli(api: FakeApi, *extra: str) -> int:
    return main(["launch", "pets-template", "--namespace", NAMESPACE, "--api-server", api.url, *extra])


def test_launch_copies_the_suspended_template_into_a_new_rayjob(api, capsys):
    assert launch_cli(api) == 0
    (created,) = [j for n, j in api.rayjobs.items() if n != "pets-template"]
    template = api.rayjobs["pets-template"]
    assert created["metadata"]["name"].startswith("pets-")
    assert created["metadata"]["labels"][k8s.TEMPLATE_LABEL] == "pets-template"
    assert created["metadata"]["labels"]["app.kubernetes.io/instance"] == "pets"
    assert "annotations" not in created["metadata"] and "managedFields" not in created["metadata"]
    assert created["spec"]["suspend"] is False
    assert {k: v for k, v in created["spec"].items() if k != "suspend"} == {
        k: v for k, v in template["spec"].items() if k != "suspend"
    }
    assert "created RayJob ml/pets-x0001 from pets-template" in capsys.readouterr().out


def test_launch_skips_while_the_last_run_is_still_going(api, capsys):
    assert launch_cli(api) == 0
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Running"}
    assert launch_cli(api) == 0
    assert "pets-x0001 from pets-template still running; skipping" in capsys.readouterr().out
    assert sorted(api.rayjobs) == ["pets-template", "pets-x0001"]
    api.rayjobs["pets-x0001"]["status"] = {"jobDeploymentStatus": "Complete"}
    assert launch_cli(api) == 0
    assert "pets-x0002" in api.rayjobs


def test_launch_prunes_finished_runs_beyond_keep(api):
    for _ in range(4):
        assert launch_cli(api, "--keep", "2") == 0
        for job in api.rayjobs.values():
            if job["metadata"]["name"] != "pets-template":
                job["status"] = {"jobDeploymentStatus": "Failed"}
    runs = sorted(n for n in api.rayjobs if n != "pets-template")
    assert runs == ["pets-x0003", "pets-x0004"], "the newest two are kept"
    deletes = [path for method, path, _ in api.requests if method == "DELETE"]
    assert deletes == [f"{RAYJOBS}/pets-x0001", f"{RAYJOBS}/pets-x0002"]


def test_launch_errors_name_the_problem(api, capsys):
    assert main(["launch", "nope", "--namespace", NAMESPACE, "--api-server", api.url]) == 2
    assert 'Kubernetes API: GET /apis/ray.io/v1/namespaces/ml/rayjobs/nope: 404 rayjobs.ray.io "nope" not found' in capsys.readouterr().err
    assert main(["launch", "pets-template"]) == 2  # not in a pod, no --api-server
    assert "tlray launch runs inside a pod" in capsys.readouterr().err


def test_the_rendered_cronjob_launches_its_own_template(capsys):
    from tlray.spec import load_spec

    from conftest import ROOT

    objects = k8s.render(load_spec(ROOT / "jobs" / "pets-s3.yaml"), "x: 1\n", "tlray:1", "cronjob")
    (template,) = [o for o in objects if o["kind"] == "RayJob"]
    (cron,) = [o for o in objects if o["kind"] == "CronJob"]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["tlray", "launch", template["metadata"]["name"]] and template["spec"]["suspend"] is True
    assert launch.run_from_template(template)["metadata"]["generateName"] == "pets-"
