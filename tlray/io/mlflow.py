"""A small MLflow client on the REST API 2.0 (standard library only): runs, metrics, params, tags, artifacts
through the server's artifact proxy, and the model registry.

Tracking is a convenience beside the record a run writes to its output (S3 or a folder): a tracking server
that is down or slow must never fail or stall training. So every request has a 5 s timeout and no retries,
and the first one that fails to connect, times out or gets a 5xx logs ONE warning and turns tracking off for
the rest of the process (per server URI); every later call returns at once. An API error (4xx) of one call
is logged and that call alone is skipped. Nothing here raises.

The tlray run is found again by its tag `tlray.run_id`: a resumed run logs into the same MLflow run.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tlray")

TIMEOUT_SECONDS = 5.0
RUN_ID_TAG = "tlray.run_id"  # the tlray run (a search trial: `<search run id>/trials/<trial>`) of an MLflow run
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests a search's trials by
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value
MAX_PARAMS_PER_BATCH = 100  # ... and on the params of one log-batch
MAX_METRICS_PER_BATCH = 1000

_off: dict[str, str] = {}  # server URI -> why tracking is off for it in this process


class Unreachable(Exception):
    """The server did not answer (refused, timed out, 5xx): tracking is now off for it."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code


def is_off(uri: str) -> bool:
    return uri.rstrip("/") in _off


class Client:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def call(self, method: str, endpoint: str, body: Mapping | None = None, query: Mapping | None = None) -> dict:
        """One request to `/api/2.0/mlflow/<endpoint>`; its JSON answer."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        answer = self._send(method, url, data, {"Content-Type": "application/json"})
        return json.loads(answer) if answer.strip() else {}

    def put_artifact(self, artifact_uri: str, name: str, data: bytes) -> None:
        """Upload one file under a run's `mlflow-artifacts:/…` root, through the server's artifact proxy."""
        root = artifact_uri.split(":", 1)[1].lstrip("/") if artifact_uri.startswith("mlflow-artifacts:") else None
        if root is None:  # a server that hands out store URIs (s3://) does not proxy; tlray writes no stores here
            raise ApiError(0, "UNSUPPORTED", f"artifact root {artifact_uri} is not served by the tracking server")
        path = urllib.parse.quote(f"{root}/{name}")
        self._send("PUT", f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{path}", data, {})

    def _send(self, method: str, url: str, data: bytes | None, headers: dict) -> bytes:
        if self.uri in _off:
            raise Unreachable(_off[self.uri])
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            if exc.code < 500:
                try:
                    error = json.loads(text)
                except ValueError:
                    error = {}
                raise ApiError(exc.code, error.get("error_code", ""), error.get("message", text[:200])) from None
            raise self._turn_off(f"HTTP {exc.code}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            raise self._turn_off(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None

    def _turn_off(self, why: str) -> Unreachable:
        _off[self.uri] = why
        log.warning("MLflow at %s unreachable (%s); tracking is off for this run, S3 stays the record", self.uri, why)
        return Unreachable(why)


def guarded(what: str, default: Any = None):
    """Calls that never raise: an unreachable server was reported once already, an API error is reported here."""

    def wrap(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Unreachable:
                return default
            except (ApiError, KeyError, TypeError, ValueError) as exc:
                log.warning("MLflow: %s failed (%s); tracking goes on without it", what, exc)
                return default

        call.__name__, call.__doc__ = fn.__name__, fn.__doc__
        return call

    return wrap


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run that a tlray run (or a search trial) logs to. Pickled into the run plan: the workers' metrics
    sink logs through it in their own processes."""

    uri: str  # the tracking server
    experiment_id: str
    run_id: str  # MLflow's
    artifact_uri: str  # mlflow-artifacts:/<experiment>/<run>/artifacts

    @property
    def client(self) -> Client:
        return Client(self.uri)

    @guarded("logging metrics")
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        rows = [
            {"key": k, "value": float(v), "timestamp": now, "step": step}
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(rows), MAX_METRICS_PER_BATCH):
            batch = rows[start : start + MAX_METRICS_PER_BATCH]
            self.client.call("POST", "runs/log-batch", {"run_id": self.run_id, "metrics": batch})

    @guarded("logging params")
    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = [{"key": k[:250], "value": str(v)[:MAX_PARAM_VALUE]} for k, v in params.items()]
        for start in range(0, len(rows), MAX_PARAMS_PER_BATCH):
            batch = rows[start : start + MAX_PARAMS_PER_BATCH]
            self.client.call("POST", "runs/log-batch", {"run_id": self.run_id, "params": batch})

    @guarded("setting tags")
    def set_tags(self, tags: Mapping[str, str]) -> None:
        rows = [{"key": k, "value": str(v)} for k, v in tags.items()]
        self.client.call("POST", "runs/log-batch", {"run_id": self.run_id, "tags": rows})

    @guarded("uploading an artifact")
    def log_artifact(self, name: str, data: bytes) -> None:
        self.client.put_artifact(self.artifact_uri, name, data)

    @guarded("ending the run")
    def end(self, status: str = "FINISHED") -> None:
        body = {"run_id": self.run_id, "status": status, "end_time": int(time.time() * 1000)}
        self.client.call("POST", "runs/update", body)


@guarded("finding the experiment")
def experiment_id(uri: str, name: str) -> str | None:
    """The experiment's id, created when it does not exist yet."""
    client = Client(uri)
    try:
        return client.call("GET", "experiments/get-by-name", query={"experiment_name": name})["experiment"][
            "experiment_id"
        ]
    except ApiError as exc:
        if exc.code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        return client.call("POST", "experiments/create", {"name": name})["experiment_id"]
    except ApiError as exc:  # created meanwhile by another run of the job
        if exc.code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.call("GET", "experiments/get-by-name", query={"experiment_name": name})["experiment"][
            "experiment_id"
        ]


@guarded("starting the run")
def start_run(
    uri: str, experiment_id: str, key: str, name: str, tags: Mapping[str, str] | None = None
) -> TrackedRun | None:
    """The MLflow run tagged `tlray.run_id = key` in the experiment, marked running again when it exists: a
    resumed tlray run goes on in the same MLflow run. None when tracking is off."""
    client = Client(uri)
    existing = find_runs(uri, experiment_id, {RUN_ID_TAG: key})
    if existing:
        info = existing[0]["info"]
        client.call("POST", "runs/update", {"run_id": info["run_id"], "status": "RUNNING"})
    else:
        all_tags = {RUN_ID_TAG: key, "mlflow.runName": name, **(tags or {})}
        body = {
            "experiment_id": experiment_id,
            "run_name": name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": str(v)} for k, v in all_tags.items()],
        }
        info = client.call("POST", "runs/create", body)["run"]["info"]
    return TrackedRun(uri.rstrip("/"), experiment_id, info["run_id"], info["artifact_uri"])


@guarded("searching runs", default=[])
def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str], max_results: int = 1000) -> list[dict]:
    """The experiment's runs with all these tags, newest first."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    body = {
        "experiment_ids": [experiment_id],
        "filter": where,
        "max_results": max_results,
        "order_by": ["attributes.start_time DESC"],
    }
    return Client(uri).call("POST", "runs/search", body).get("runs", [])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (`train.lr`); lists stay whole values (`[1, "all"]`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = json.dumps(value) if isinstance(value, (list, tuple)) or value is None else value
    return flat


# ---------------------------------------------------------------------------------------
# Model registry
# ---------------------------------------------------------------------------------------
@guarded("registering the model version")
def register_version(run: TrackedRun, model_name: str, source: str, tags: Mapping | None = None) -> str | None:
    """A new version of `model_name` (the registered model is created on first use) for `source`, logged by
    `run`; its version number. A source registered before (a finished run published again) keeps its version."""
    client = Client(run.uri)
    try:
        client.call("POST", "registered-models/create", {"name": model_name})
    except ApiError as exc:
        if exc.code != "RESOURCE_ALREADY_EXISTS":
            raise
    query = {"filter": f"name = '{model_name}' and run_id = '{run.run_id}'"}
    same = client.call("GET", "model-versions/search", query=query).get("model_versions", [])
    for version in same:
        if version.get("source") == source:
            return version["version"]
    body = {
        "name": model_name,
        "source": source,
        "run_id": run.run_id,
        "tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()],
    }
    return client.call("POST", "model-versions/create", body)["model_version"]["version"]


@guarded("setting the alias")
def set_alias(uri: str, model_name: str, alias: str, version: str) -> None:
    Client(uri).call("POST", "registered-models/alias", {"name": model_name, "alias": alias, "version": version})


@guarded("reading the alias")
def alias_version(uri: str, model_name: str, alias: str) -> str | None:
    """The version `alias` points at; None when it points nowhere."""
    try:
        answer = Client(uri).call("GET", "registered-models/alias", query={"name": model_name, "alias": alias})
    except ApiError as exc:
        if exc.code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return answer["model_version"]["version"]
