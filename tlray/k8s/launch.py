"""`tlray launch TEMPLATE`: start one scheduled run by copying a suspended RayCronJob's jobTemplate.

The scheduled-retraining fallback for clusters where KubeRay's RayCronJob is off (or too loose): a
plain `batch/v1` CronJob runs this command in the tlray image. It copies the jobTemplate of the
RayCronJob named TEMPLATE (kept `suspend: true`, so KubeRay creates nothing for it, and a kind Kueue
does not manage) into a new RayJob with a generated name, unless a run made from the same template
is still going (a CronJob's `concurrencyPolicy: Forbid` only covers this short pod, not the RayJob it
creates) or still queued by Kueue (Kueue creates the RayJobs it manages suspended: replacing one would
send the run to the back of the queue at every tick). A run suspended by hand does not block: the new
run replaces it. It then deletes the oldest finished runs beyond `keep`.

With `--if-data-changed`, the pod first lists the dataset and reads the job's latest.json, and creates
no RayJob when the champion was trained on exactly this data: a scheduled tick on unchanged data then
costs this 0.5 GiB pod, not a GPU cluster. That check loads the spec, the S3 client and pyarrow (no torch,
no Ray); without it, only the standard library: the Kubernetes API over HTTPS with the pod's token.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tlray.errors import UserError
from tlray.k8s.manifests import FINISHED_STATES, KUEUE_QUEUE_LABEL, SUSPENDED_STATES, TEMPLATE_LABEL

KUEUE_MANAGER_PREFIX = "kueue.x-k8s.io/"  # spec.managedBy of a RayJob that MultiKueue dispatches

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT_SECONDS = 30


def api_server_url(host: str, port: str) -> str:
    """https://HOST:PORT, with an IPv6 address in brackets (KUBERNETES_SERVICE_HOST is a bare address)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


class KubernetesApi:
    """The few calls `launch` makes, against `server` (in a pod: the API server, with the pod's token)."""

    def __init__(
        self, server: str, token: str | None = None, ca_file: str | None = None, timeout: float = TIMEOUT_SECONDS
    ):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file) if server.startswith("https") else None

    @classmethod
    def in_cluster(cls) -> KubernetesApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SERVICE_ACCOUNT / "token").exists():
            raise UserError(
                "tlray launch runs inside a pod (no KUBERNETES_SERVICE_HOST or ServiceAccount token here); "
                "pass --api-server to use another API server"
            )
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return cls(api_server_url(host, port), token, str(SERVICE_ACCOUNT / "ca.crt"))

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise KubernetesApiError(method, path, exc.code, _message(exc.read())) from None
        except urllib.error.URLError as exc:
            raise UserError(f"Kubernetes API at {self.server} unreachable: {exc.reason}") from None
        # A timeout or a dropped connection while reading the answer is not wrapped in a URLError.
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, TLS errors, short reads
            reason = str(exc) or type(exc).__name__
            raise UserError(
                f"Kubernetes API at {self.server}: {method} {path}: no complete answer ({reason})"
            ) from None
        except ValueError:
            raise UserError(f"Kubernetes API at {self.server}: {method} {path}: the answer is not JSON") from None


class KubernetesApiError(UserError):
    def __init__(self, method: str, path: str, code: int, message: str):
        self.code = code
        super().__init__(f"Kubernetes API: {method} {path}: {code} {message}")


def _message(body: bytes) -> str:
    """The `message` of a Kubernetes Status answer, else the body as text."""
    text = body.decode(errors="replace")
    try:
        return json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        return text


def launch(
    api: KubernetesApi,
    namespace: str,
    template: str,
    keep: int = 5,
    data_check: Callable[[dict], str | None] | None = None,
) -> str | None:
    """Create a RayJob from the RayCronJob `template`; None when a run from it is still going or queued, or
    when `data_check` (given the template) returns the line that says the data is unchanged."""
    rayjobs = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    source = api.call("GET", f"/apis/ray.io/v1/namespaces/{namespace}/raycronjobs/{template}")
    runs = api.call("GET", rayjobs, query={"labelSelector": f"{TEMPLATE_LABEL}={template}"}).get("items", [])
    going = [r["metadata"]["name"] for r in runs if run_state(r) == "going"]
    if going:
        print(f"[tlray] {', '.join(going)} from {template} still running; skipping this run")
        return None
    queued = [r for r in runs if run_state(r) == "queued"]
    if queued:
        held = ", ".join(f"{r['metadata']['name']} ({queue_of(r)})" for r in queued)
        print(f"[tlray] {held} from {template} still queued by Kueue; leaving it its place, skipping this run")
        return None
    if data_check is not None and (unchanged := data_check(source)):
        print(unchanged)
        return None
    created = api.call("POST", rayjobs, body=run_from_template(source))
    name = created["metadata"]["name"]
    print(f"[tlray] created RayJob {namespace}/{name} from {template}")
    for old in (r["metadata"]["name"] for r in runs if run_state(r) == "suspended"):
        delete(api, f"{rayjobs}/{old}")
        print(f"[tlray] deleted RayJob {old}, suspended by hand: {name} replaces it")
    for old in stale_runs(runs, keep):
        delete(api, f"{rayjobs}/{old}")
        print(f"[tlray] deleted finished RayJob {old} (keeping the last {keep})")
    return name


def data_check(spec_path: str) -> Callable[[dict], str | None]:
    """`--if-data-changed` in the launcher pod: the same test the driver makes, before any cluster exists."""

    def unchanged(template: dict) -> str | None:
        from tlray.artifacts import champion
        from tlray.data.index import build_index
        from tlray.spec import load_spec

        spec = load_spec(spec_path, spec_overrides(template["spec"]["jobTemplate"].get("entrypoint", "")))
        index = build_index(spec.dataset)
        print(f"[tlray] dataset: {index.summary()}")
        return champion.unchanged_data_message(spec.job_uri, index.fingerprint, spec.dataset.endpoint_url)

    return unchanged


def spec_overrides(entrypoint: str) -> list[str]:
    """The `--set KEY=VALUE` of a run's entrypoint: the spec the run will read is the file plus these."""
    import shlex

    words = shlex.split(entrypoint)
    found = [value for flag, value in zip(words, words[1:], strict=False) if flag == "--set"]
    return found + [word.removeprefix("--set=") for word in words if word.startswith("--set=")]


def delete(api: KubernetesApi, path: str) -> None:
    try:
        api.call("DELETE", path)
    except KubernetesApiError as exc:
        if exc.code != 404:  # already gone (deleted by hand, or by a concurrent launch) is what we wanted
            raise


def run_from_template(template: dict) -> dict:
    """A RayJob of the template's jobTemplate, under a generated name, labelled with its template.

    Only the labels (and annotations that are not kubectl's) are carried over: a new object must not
    inherit the template's finalizers, owner references or the fields the API server sets."""
    metadata = template["metadata"]
    annotations = {
        k: v for k, v in metadata.get("annotations", {}).items() if not k.startswith("kubectl.kubernetes.io/")
    }
    job = {
        "apiVersion": template["apiVersion"],
        "kind": "RayJob",
        "metadata": {
            "generateName": f"{metadata['name'].removesuffix('-template')}-",
            "labels": {**metadata.get("labels", {}), TEMPLATE_LABEL: metadata["name"]},
        },
        "spec": template["spec"]["jobTemplate"],
    }
    if annotations:
        job["metadata"]["annotations"] = annotations
    return job


def run_state(rayjob: dict) -> str:
    """One of "finished", "queued" (suspended, held by Kueue), "suspended" (by hand) or "going" (which includes
    a RayJob KubeRay has not looked at yet)."""
    state = rayjob.get("status", {}).get("jobDeploymentStatus")
    if state in FINISHED_STATES:
        return "finished"
    if state in SUSPENDED_STATES or rayjob.get("spec", {}).get("suspend"):
        return "queued" if queue_of(rayjob) else "suspended"
    return "going"


def queue_of(rayjob: dict) -> str | None:
    """Who holds a suspended RayJob: its Kueue LocalQueue (the queue label, or Kueue's managedBy), else None."""
    queue = rayjob["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL)
    if queue:
        return f"LocalQueue {queue}"
    manager = rayjob.get("spec", {}).get("managedBy") or ""
    return f"managed by {manager}" if manager.startswith(KUEUE_MANAGER_PREFIX) else None


def stale_runs(runs: list[dict], keep: int) -> list[str]:
    """Finished runs beyond the newest `keep` (the one just created is not among `runs`)."""
    done = sorted(
        (r for r in runs if run_state(r) == "finished"), key=lambda r: r["metadata"].get("creationTimestamp", "")
    )
    return [r["metadata"]["name"] for r in done[: max(0, len(done) - (keep - 1))]]


def current_namespace() -> str:
    path = SERVICE_ACCOUNT / "namespace"
    return path.read_text().strip() if path.exists() else "default"
