"""`tlray launch TEMPLATE`: start one scheduled run by copying a suspended RayJob.

The scheduled-retraining fallback for clusters without KubeRay's RayCronJob: a plain
`batch/v1` CronJob runs this command in the tlray image. It copies the RayJob named
TEMPLATE (kept `suspend: true`, so KubeRay creates nothing for it) into a new RayJob with a
generated name, unless a run made from the same template is still going (a CronJob's
`concurrencyPolicy: Forbid` only covers this short pod, not the RayJob it creates). It then
deletes the oldest finished runs beyond `keep`. Only the standard library: the Kubernetes API
over HTTPS with the pod's ServiceAccount token.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tlray.errors import UserError
from tlray.k8s import FINISHED_STATES, TEMPLATE_LABEL

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Set by the API server on objects it stores; a new object must not carry them.
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink", "deletionTimestamp")


class KubernetesApi:
    """The few calls `launch` makes, against `server` (in a pod: the API server, with the pod's token)."""

    def __init__(self, server: str, token: str | None = None, ca_file: str | None = None):
        self.server = server.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if server.startswith("https") else None

    @classmethod
    def in_cluster(cls) -> KubernetesApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SERVICE_ACCOUNT / "token").exists():
            raise UserError("tlray launch runs inside a pod (no KUBERNETES_SERVICE_HOST or ServiceAccount token here); "
                            "pass --api-server to use another API server")
        return cls(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(), str(SERVICE_ACCOUNT / "ca.crt"))

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except ValueError:
                pass
            raise UserError(f"Kubernetes API: {method} {path}: {exc.code} {detail}") from None
        except urllib.error.URLError as exc:
            raise UserError(f"Kubernetes API at {self.server} unreachable: {exc.reason}") from None


def launch(api: KubernetesApi, namespace: str, template: str, keep: int = 5) -> str | None:
    """Create a RayJob from `template`; None when a run from it is still going."""
    rayjobs = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    source = api.call("GET", f"{rayjobs}/{template}")
    runs = api.call("GET", rayjobs, query={"labelSelector": f"{TEMPLATE_LABEL}={template}"}).get("items", [])
    running = [r["metadata"]["name"] for r in runs if not finished(r)]
    if running:
        print(f"[tlray] {', '.join(running)} from {template} still running; skipping this run")
        return None
    created = api.call("POST", rayjobs, body=run_from_template(source))
    name = created["metadata"]["name"]
    print(f"[tlray] created RayJob {namespace}/{name} from {template}")
    for old in stale_runs(runs, keep):
        api.call("DELETE", f"{rayjobs}/{old}")
        print(f"[tlray] deleted finished RayJob {old} (keeping the last {keep})")
    return name


def run_from_template(template: dict) -> dict:
    """The template's spec, unsuspended, under a generated name and labelled with its template."""
    metadata = template["metadata"]
    labels = {**metadata.get("labels", {}), TEMPLATE_LABEL: metadata["name"]}
    clean = {k: v for k, v in metadata.items() if k not in (*SERVER_FIELDS, "name", "labels", "annotations", "ownerReferences")}
    annotations = {k: v for k, v in metadata.get("annotations", {}).items() if not k.startswith("kubectl.kubernetes.io/")}
    job = {
        "apiVersion": template["apiVersion"],
        "kind": template["kind"],
        "metadata": {**clean, "generateName": f"{metadata['name'].removesuffix('-template')}-", "labels": labels},
        "spec": {**template["spec"], "suspend": False},
    }
    if annotations:
        job["metadata"]["annotations"] = annotations
    return job


def finished(rayjob: dict) -> bool:
    return rayjob.get("status", {}).get("jobDeploymentStatus") in FINISHED_STATES


def stale_runs(runs: list[dict], keep: int) -> list[str]:
    """Finished runs beyond the newest `keep` (the one just created is not among `runs`)."""
    done = sorted((r for r in runs if finished(r)), key=lambda r: r["metadata"].get("creationTimestamp", ""))
    return [r["metadata"]["name"] for r in done[: max(0, len(done) - (keep - 1))]]


def current_namespace() -> str:
    path = SERVICE_ACCOUNT / "namespace"
    return path.read_text().strip() if path.exists() else "default"
