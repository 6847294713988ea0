"""Kubernetes manifests for a job spec: KubeRay RayJob, RayCluster, RayCronJob, or a CronJob fallback.

One source for `tlray render` and for the files in `k8s/` (`make manifests` writes those from
`jobs/pets-s3.yaml`; a test keeps them in sync). Every pod template gets the same hardening:
Pod Security Standards "restricted", requests = limits, `/dev/shm` in memory for Ray's
object store, S3 credentials from the ServiceAccount (EKS Pod Identity / IRSA) or from an
optional Secret, never a literal.

Light on purpose: `tlray render` and `tlray launch` (in a 0.5 GiB pod) import this module, so it
needs neither torch nor pyarrow (`tlray.archs` has the weights names it checks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from tlray import archs, names
from tlray.errors import UserError

if TYPE_CHECKING:  # pydantic stays out of `tlray launch`
    from tlray.spec import JobSpec

RAY_VERSION = "2.60.0"
SPEC_DIR, SPEC_FILE = "/etc/tlray", "job.yaml"
S3_SECRET = "tlray-s3-credentials"  # optional: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, when no role is possible
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of the rayproject/ray images
KINDS = ("rayjob", "raycluster", "raycronjob", "cronjob")
DEFAULT_SCHEDULE = "0 3 * * 1"  # Mondays 03:00

# RayJob states (status.jobDeploymentStatus) as `tlray launch` sees them: a finished run is pruned; a
# suspended one that Kueue holds (waiting for quota, or preempted and requeued) keeps its place, so the
# next run waits; one suspended by hand is replaced by the next scheduled run; any other state means the
# run is still going, so the next one waits.
FINISHED_STATES = ("Complete", "Failed", "ValidationFailed")
SUSPENDED_STATES = ("Suspending", "Suspended")
TEMPLATE_LABEL = "tlray.dev/template"  # on RayJobs that `tlray launch` made from a template
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# A run's GPUs are released one minute after it ends: KubeRay deletes the whole RayCluster then
# (shutdownAfterJobFinishes); the RayJob and its submitter Job, which holds the logs, stay.
# deletionStrategy rules (workers at once, head later) would need shutdownAfterJobFinishes: false, which
# KubeRay refuses on a suspended RayJob, and Kueue creates every RayJob it manages suspended.
CLUSTER_TTL_SECONDS = 60
# KubeRay's retry rule (v1.7): a failed RayJob is retried, with a new Ray cluster, up to backoffLimit times,
# unless it failed for DeadlineExceeded (activeDeadlineSeconds) or JobStatusCheckTimeoutExceeded. A missed
# preRunningDeadlineSeconds IS retried, and each retry restarts the clock (StartTime is reset). So a run
# whose GPU workers cannot all be placed holds the head and the placed workers for up to
# (BACKOFF_LIMIT + 1) x PRE_RUNNING_DEADLINE_SECONDS = UNPLACEABLE_HOLD_SECONDS, then fails for good.
# The retries are there for runs that did start: a preempted or crashed run resumes from its checkpoints.
PRE_RUNNING_DEADLINE_SECONDS = 10 * 60  # creation to Running: nodes provisioned, image pulled, job submitted
BACKOFF_LIMIT = 2
UNPLACEABLE_HOLD_SECONDS = (BACKOFF_LIMIT + 1) * PRE_RUNNING_DEADLINE_SECONDS  # 30 minutes
ACTIVE_DEADLINE_SECONDS = 24 * 3600  # per attempt; a run past it is not retried

# Preemption and eviction: KubeRay starts the head as `bash -c "... ray start --head --block"`, and bash as
# PID 1 ignores SIGTERM, so the driver would only ever see the SIGKILL at the end of the grace period. The
# head's preStop hook (tlray.prestop) sends SIGTERM to the tlray driver itself and waits for it to exit:
# tlray then stops the run as Ctrl-C does and keeps every sealed checkpoint. The grace period covers the
# hook's wait; the hook's wait covers the measured stop (1.8-3.5 s on an idle machine, 6 s on 2 busy CPUs,
# tests/e2e/test_prestop.py) plus a checkpoint upload already under way
# (ResNet-50 with AdamW state: about 0.3 GB, 30 s at a slow 10 MB/s), twice over. Only the head gets it:
# the workers have nothing to save, and their GPUs should go back at once.
PRESTOP_WAIT_SECONDS = 90
TERMINATION_GRACE_SECONDS = PRESTOP_WAIT_SECONDS + 30  # the hook's wait, then the kubelet's SIGTERM and SIGKILL
PRESTOP_COMMAND = ["python", "-m", "tlray.prestop", "--wait", str(PRESTOP_WAIT_SECONDS)]

# The frozen-prefix cache goes to an emptyDir of its own, not the container's writable layer (which the
# kubelet does not limit per pod, and which fills the node's root disk): sizeLimit is the spec's
# train.cache_budget_gb plus room for the entry being written. Over the limit, the kubelet evicts the pod.
CACHE_DIR = "/var/cache/tlray"
CACHE_HEADROOM = 1.25

# GPU pods are placed by their nvidia.com/gpu request and this toleration, not by a node label: labels that
# GPU feature discovery adds (nvidia.com/gpu.present) exist only once a node has joined, so Karpenter and
# Cluster Autoscaler, scaling from zero, never launch a node for them. A selector is opt-in (--node-selector,
# k8s/components/gpu-node-selector) and must name a label the autoscaler knows before the node exists.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Pods that Cluster Autoscaler and Karpenter must not evict to consolidate nodes: losing the head ends
# the run, losing a worker restarts training from its last checkpoint.
DO_NOT_DISRUPT = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "karpenter.sh/do-not-disrupt": "true"}

# Network ports, see network_policy()
JOB_API_PORT = 8265
METRICS_PORTS = (8080, 44217, 44227)  # Ray metrics on every pod; autoscaler and dashboard metrics on the head
DNS_PORT = 53
HTTPS_PORT = 443
API_SERVER_PORT = 6443  # the API server's endpoint port on kubeadm, kind, k3s (managed clouds: 443)
# EKS Pod Identity's credential agent, on every node (IPv4 and IPv6 clusters); nothing listens there elsewhere.
POD_IDENTITY_AGENT = ("169.254.170.23/32", "fd00:ec2::23/128")
KUBERAY_OPERATOR = {"app.kubernetes.io/component": "kuberay-operator"}  # set by both the Helm and kustomize installs


@dataclass(frozen=True)
class ClusterOptions:
    """What depends on the cluster rather than the job: `tlray render` flags, `k8s/components/*` patches."""

    api_server_ports: tuple[int, ...] = ()  # beyond 443 and 6443, e.g. 8443 on minikube
    dns_ports: tuple[int, ...] = ()  # beyond 53, e.g. 5353 on OpenShift
    irsa_role_arn: str | None = None  # S3 through IRSA instead of EKS Pod Identity
    priority_class: str | None = None  # PriorityClass of the Ray pods
    queue: str | None = None  # Kueue LocalQueue of the RayJobs
    egress_ports: tuple[int, ...] = ()  # beyond those of the spec's stores, e.g. a tracking server's
    node_selector: tuple[tuple[str, str], ...] = ()  # of the GPU workers: a label the autoscaler knows


@dataclass(frozen=True)
class Sizing:
    """Worker pods for a spec: one pod per Ray Train worker of each concurrent trial."""

    worker_pods: int
    cpus: int  # per worker pod: the Train worker's CPUs plus one for Ray Data decoding
    gpus: int
    memory_gib: int
    cache_gib: int = 10  # the frozen-prefix cache volume of each Ray pod

    @classmethod
    def of(cls, spec: JobSpec) -> Sizing:
        trials = (spec.tune.max_concurrent_trials or 1) if spec.tune else 1
        gpus = math.ceil(spec.scaling.gpus_per_worker) if spec.scaling.use_gpu else 0
        cpus = math.ceil(spec.scaling.cpus_per_worker) + 1
        cache = cache_volume_gib(spec.train.cache_budget_gb)
        return cls(spec.scaling.num_workers * trials, cpus, gpus, 4 * cpus + 12 * gpus, cache)


def cache_volume_gib(budget_gb: float) -> int:
    return math.ceil(budget_gb * CACHE_HEADROOM)


def entrypoint(spec: JobSpec, scheduled: bool = False) -> str:
    """The command a RayJob runs; `ray job submit --working-dir DIR` runs the same one with DIR/job.yaml.

    A scheduled run retrains only when the data changed since the champion was trained: on the same
    data it exits 0 at once, with one line, and the cluster it started goes away.
    """
    command = f"tlray {'tune' if spec.tune else 'train'} {SPEC_FILE}"
    return f"{command} --if-data-changed" if scheduled else command


def render(
    spec: JobSpec,
    spec_yaml: str,
    image: str,
    kind: str = "rayjob",
    namespace: str | None = None,
    schedule: str = DEFAULT_SCHEDULE,
    options: ClusterOptions = ClusterOptions(),
) -> list[dict]:
    """Everything `kubectl apply -f` needs for one spec, in apply order."""
    check_kind(spec.name, kind, options)
    name, sizing = spec.name, Sizing.of(spec)
    stores = tuple(port for port, _ in egress_ports(spec, options))
    objects = [service_account(name, options.irsa_role_arn), network_policy(name, options, stores)]
    if kind != "raycluster":
        objects.append(spec_config_map(name, spec_yaml))
    if kind == "rayjob":
        objects.append(ray_job(name, image, sizing, entrypoint(spec)))
    elif kind == "raycluster":
        objects.append(ray_cluster(name, image, sizing))
    elif kind == "raycronjob":
        objects.append(ray_cron_job(name, image, sizing, entrypoint(spec, scheduled=True), schedule))
    else:  # cronjob: a suspended RayCronJob is the template that `tlray launch` copies
        template = ray_cron_job(
            f"{name}-template", image, sizing, entrypoint(spec, scheduled=True), schedule, instance=name
        )
        template["spec"]["suspend"] = True
        objects += launcher_rbac(name, options.irsa_role_arn) + [
            launcher_network_policy(name, options, stores),
            template,
            launcher_cron_job(name, image, schedule),
        ]
    for obj in objects:
        place(obj, name, options)
        if namespace:
            obj["metadata"]["namespace"] = namespace
    return objects


def egress_ports(spec: JobSpec, options: ClusterOptions = ClusterOptions()) -> list[tuple[int, str]]:
    """(TCP port, why) of every server the pods talk to beyond 443, which is open anyway: the port of
    dataset.endpoint_url (the one endpoint of every s3:// URI of the job), of tracking.mlflow.uri (the tracking
    server, written in the spec: one taken from MLFLOW_TRACKING_URI in the pod needs --egress-port), then
    --egress-port."""
    wanted: list[tuple[int, str]] = []
    if spec.dataset.endpoint_url:
        port = url_port(spec.dataset.endpoint_url, "dataset.endpoint_url")
        if port != HTTPS_PORT:
            wanted.append((port, f"dataset.endpoint_url {spec.dataset.endpoint_url} (data, weights, output)"))
    tracking = tracking_uri(spec)
    if tracking:
        port = url_port(tracking, "tracking.mlflow.uri")
        if port != HTTPS_PORT:
            wanted.append((port, f"tracking.mlflow.uri {tracking} (the MLflow tracking server)"))
    wanted += [(port, "--egress-port") for port in options.egress_ports if port != HTTPS_PORT]
    first_reason: dict[int, str] = {}
    for port, why in wanted:
        first_reason.setdefault(port, why)  # a port named twice is opened once
    return list(first_reason.items())


def tracking_uri(spec: JobSpec) -> str | None:
    """tracking.mlflow.uri as the spec file sets it; the render machine's MLFLOW_TRACKING_URI is not the pod's."""
    return spec.tracking.mlflow.uri if spec.tracking.mlflow is not None else None


def url_port(url: str, key: str = "dataset.endpoint_url") -> int:
    """The URL's port; without one, 80 for http and 443 for https. `key`: the spec key it comes from."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        explicit = parts.port
    except ValueError:
        raise UserError(f"{key}: '{url}' has no valid port") from None
    return explicit or (80 if parts.scheme == "http" else HTTPS_PORT)


def node_selector_pair(text: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label:
        raise UserError(f"--node-selector: '{text}' is not LABEL=VALUE")
    return label, value


def egress_notes(spec: JobSpec, options: ClusterOptions = ClusterOptions()) -> list[str]:
    """What `render` says on stderr about the store ports it opened."""
    opened = [f"egress to TCP {port} opened for {why}" for port, why in egress_ports(spec, options)]
    if spec.dataset.endpoint_url and url_port(spec.dataset.endpoint_url) == HTTPS_PORT:
        opened.append(f"dataset.endpoint_url {spec.dataset.endpoint_url} is on 443, which is open already")
    tracking = tracking_uri(spec)
    if tracking and url_port(tracking, "tracking.mlflow.uri") == HTTPS_PORT:
        opened.append(f"tracking.mlflow.uri {tracking} is on 443, which is open already")
    return opened


def check_kind(name: str, kind: str, options: ClusterOptions) -> None:
    """Refuse what KubeRay would accept and then never run."""
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}")
    if kind == "raycronjob" and (problem := names.raycronjob_name_problem(name)):
        raise UserError(problem)
    if kind == "raycronjob" and options.queue:
        raise UserError(
            "--queue: a RayCronJob (KubeRay v1.7) cannot label the RayJobs it creates, so Kueue would never "
            "see them; use --kind cronjob, whose runs carry the queue label"
        )
    if kind == "raycluster" and options.queue:
        raise UserError(
            "--queue: Kueue's webhook refuses a queued RayCluster with enableInTreeAutoscaling ('a kueue managed job "
            "should not use autoscaling') unless it is an elastic job, which needs Kueue's alpha feature gate "
            "ElasticJobsViaWorkloadSlices; queue the runs instead: --kind rayjob or --kind cronjob"
        )


def kind_warnings(kind: str) -> list[str]:
    """What the user should know before relying on a kind."""
    if kind != "raycronjob":
        return []
    return [
        "RayCronJob is alpha (operator feature gate RayCronJob, off by default) and has no concurrency policy, "
        "starting deadline or history limit: after a pause or an operator outage it starts one RayJob per missed "
        "tick, and it keeps every RayJob it creates. For GPU jobs prefer --kind cronjob (see the README).",
        "RayCronJob starts the whole Ray cluster, GPU workers included, at every tick: --if-data-changed runs in "
        "its driver, once the cluster is up. --kind cronjob checks the data in a small launcher pod first and "
        "creates no RayJob when nothing changed.",
    ]


def place(obj: dict, name: str, options: ClusterOptions) -> None:
    """Scheduling choices of the cluster: the Ray pods' PriorityClass, the workers' nodes, the Kueue queue."""
    for pod in pod_specs(obj.get("spec", {})):
        if options.priority_class and pod.get("serviceAccountName") == f"{name}-ray":  # not the launcher
            pod["priorityClassName"] = options.priority_class
        if options.node_selector and pod["containers"][0]["name"] == "ray-worker":
            pod["nodeSelector"] = dict(options.node_selector)
    # Kueue manages RayJobs and RayClusters; it ignores RayCronJobs, so on the fallback's template the label
    # is inert until `tlray launch` copies it onto each run.
    queued = obj["kind"] in ("RayJob", "RayCluster") or obj["metadata"]["name"] == f"{name}-template"
    if options.queue and queued:
        obj["metadata"]["labels"][KUEUE_QUEUE_LABEL] = options.queue


def pod_specs(node):
    """Every pod spec in a manifest, however deep (head, workers, submitter, CronJob)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # shared dicts (security contexts) are written out in full
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """Multi-line strings (the embedded spec) as literal blocks, readable in the manifest."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text)


def to_yaml(objects: list[dict]) -> str:
    return "---\n".join(yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120) for obj in objects)


def cluster_warnings(spec: JobSpec) -> list[str]:
    """Paths that exist only on this machine: the pods cannot read or write them."""
    places = [("dataset.uri", spec.dataset.uri), ("output.uri", spec.output.uri)]
    weights = spec.model.builder_weights
    if weights and archs.torchvision_weights_name(spec.model.arch, weights) is None:  # a checkpoint
        places.append(("model.weights", weights))
    return [
        f"{key}: '{uri}' is a local path; pods on the cluster read and write s3:// URIs"
        for key, uri in places
        if not uri.startswith("s3://")
    ]


# ---------------------------------------------------------------------------------------
# The Ray cluster
# ---------------------------------------------------------------------------------------
def labels(instance: str, component: str | None = None) -> dict:
    out = {"app.kubernetes.io/name": "tlray", "app.kubernetes.io/instance": instance}
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def ray_cluster_spec(instance: str, image: str, sizing: Sizing, autoscaling: bool = False) -> dict:
    worker = container("ray-worker", image, sizing.cpus, sizing.memory_gib, sizing.gpus, ports=RAY_WORKER_PORTS)
    worker_pod = with_cache_volume(
        pod_template(instance, "ray-worker", worker, sizing.memory_gib, DO_NOT_DISRUPT), sizing.cache_gib
    )
    if sizing.gpus:
        worker_pod["spec"]["tolerations"] = [dict(GPU_TOLERATION)]
    workers = {
        "groupName": "gpu-workers" if sizing.gpus else "cpu-workers",
        "replicas": 0 if autoscaling else sizing.worker_pods,
        "minReplicas": 0 if autoscaling else sizing.worker_pods,
        "maxReplicas": sizing.worker_pods,
        "rayStartParams": {},
        "template": worker_pod,
    }
    head_container = container("ray-head", image, 2, 8, ports=RAY_HEAD_PORTS)
    head_container["lifecycle"] = {"preStop": {"exec": {"command": list(PRESTOP_COMMAND)}}}
    head = with_cache_volume(pod_template(instance, "ray-head", head_container, 8, DO_NOT_DISRUPT), sizing.cache_gib)
    head["spec"]["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
    if autoscaling:
        # The autoscaler sidecar talks to the API server; KubeRay binds its Role to this ServiceAccount.
        head["spec"]["automountServiceAccountToken"] = True
    spec = {
        "rayVersion": RAY_VERSION,
        # Ray 2.60 token auth: KubeRay makes the token Secret and hands it to every Ray process.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # no training on the head: it runs the driver, the trial drivers and the dashboard
            "rayStartParams": {"num-cpus": "0"},
            "template": head,
        },
        "workerGroupSpecs": [workers],
    }
    if autoscaling:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {
            "idleTimeoutSeconds": 300,
            "resources": resources(0.5, 1),
            "securityContext": CONTAINER_SECURITY,
        }
    return spec


RAY_METRICS_PORT = {"name": "metrics", "containerPort": METRICS_PORTS[0]}
RAY_HEAD_PORTS = [
    {"name": "gcs", "containerPort": 6379},
    {"name": "dashboard", "containerPort": JOB_API_PORT},
    {"name": "client", "containerPort": 10001},
    RAY_METRICS_PORT,
]
RAY_WORKER_PORTS = [RAY_METRICS_PORT]


def ray_job(name: str, image: str, sizing: Sizing, command: str) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": ray_job_spec(name, image, sizing, command),
    }


def ray_job_spec(instance: str, image: str, sizing: Sizing, command: str) -> dict:
    return {
        "entrypoint": command,
        # the submitter uploads the mounted spec folder; the driver runs in it (as `ray job submit --working-dir`)
        "runtimeEnvYAML": f"working_dir: {SPEC_DIR}",
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template(instance, image),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": CLUSTER_TTL_SECONDS,
        "preRunningDeadlineSeconds": PRE_RUNNING_DEADLINE_SECONDS,
        "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
        "backoffLimit": BACKOFF_LIMIT,
        "rayClusterSpec": ray_cluster_spec(instance, image, sizing),
    }


def submitter_template(instance: str, image: str) -> dict:
    submitter = container("ray-job-submitter", image, 0.5, 1)
    submitter["volumeMounts"].append({"name": "job-spec", "mountPath": f"{SPEC_DIR}/{SPEC_FILE}", "subPath": SPEC_FILE})
    template = pod_template(instance, "submitter", submitter, 1)
    template["spec"]["restartPolicy"] = "Never"
    template["spec"]["volumes"].append({"name": "job-spec", "configMap": {"name": f"{instance}-spec"}})
    return template


def ray_cluster(name: str, image: str, sizing: Sizing) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": ray_cluster_spec(name, image, sizing, autoscaling=True),
    }


def ray_cron_job(
    name: str, image: str, sizing: Sizing, command: str, schedule: str, instance: str | None = None
) -> dict:
    instance = instance or name
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": name, "labels": labels(instance)},
        "spec": {"schedule": schedule, "jobTemplate": ray_job_spec(instance, image, sizing, command)},
    }


# ---------------------------------------------------------------------------------------
# Pods: the same hardening everywhere
# ---------------------------------------------------------------------------------------
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "fsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def resources(cpus: float, memory_gib: float, gpus: int = 0) -> dict:
    amounts = {"cpu": f"{int(cpus * 1000)}m" if cpus != int(cpus) else str(int(cpus)), "memory": f"{memory_gib:g}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}  # Guaranteed QoS: Ray sizes itself from limits


def container(name: str, image: str, cpus: float, memory_gib: float, gpus: int = 0, ports: list | None = None) -> dict:
    out = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources(cpus, memory_gib, gpus),
        "securityContext": CONTAINER_SECURITY,
        # static S3 keys only where no role is possible, from a Secret that may not exist
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        out["ports"] = ports
    return out


def pod_template(instance: str, component: str, main: dict, memory_gib: float, annotations: dict | None = None) -> dict:
    """A pod of the Ray ServiceAccount around `main`, whose memory limit is `memory_gib`."""
    metadata = {"labels": labels(instance, component)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "metadata": metadata,
        "spec": {
            "serviceAccountName": f"{instance}-ray",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [main],
            # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(1, memory_gib // 2):g}Gi"}}
            ],
        },
    }


def with_cache_volume(template: dict, size_gib: int) -> dict:
    """The frozen-prefix cache (and $TLRAY_CACHE_DIR) on an emptyDir of its own; see CACHE_DIR."""
    pod = template["spec"]
    main = pod["containers"][0]
    main.setdefault("env", []).append({"name": "TLRAY_CACHE_DIR", "value": CACHE_DIR})
    main["volumeMounts"].append({"name": "tlray-cache", "mountPath": CACHE_DIR})
    pod["volumes"].append({"name": "tlray-cache", "emptyDir": {"sizeLimit": f"{size_gib}Gi"}})
    return template


# ---------------------------------------------------------------------------------------
# Identity, network, spec
# ---------------------------------------------------------------------------------------
def service_account(name: str, irsa_role_arn: str | None = None) -> dict:
    """The Ray pods' identity. S3 without static keys: EKS Pod Identity binds a role to this account
    (`aws eks create-pod-identity-association`, nothing to set here); IRSA needs the role's annotation.
    Only one of them: botocore tries IRSA first, so an annotation would shadow a Pod Identity association."""
    metadata = {"name": f"{name}-ray", "labels": labels(name)}
    if irsa_role_arn:
        metadata["annotations"] = {"eks.amazonaws.com/role-arn": irsa_role_arn}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata, "automountServiceAccountToken": False}


def tcp(*ports: int) -> list[dict]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def ray_pods(name: str) -> dict:
    """The selector of this job's Ray pods (head, workers, submitter): the launcher has a policy of its own."""
    return {
        "matchLabels": labels(name),
        "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["launcher"]}],
    }


def network_policy(name: str, options: ClusterOptions = ClusterOptions(), stores: tuple[int, ...] = ()) -> dict:
    """Ray's ports (GCS, job API 8265, object transfer, workers) only among this job's pods: an exposed job
    API runs anyone's code (CVE-2023-48022, "ShadowRay"). Egress rules are matched after Service addresses
    are rewritten (Calico, Cilium, kube-router), so they name the ports the endpoints listen on."""
    own_pods = {"podSelector": ray_pods(name)}
    any_pod = {"namespaceSelector": {}}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": labels(name)},
        "spec": {
            "podSelector": ray_pods(name),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [own_pods]},
                # the KubeRay operator polls the job API for the RayJob's status (any install, any namespace)
                {"from": [{**any_pod, "podSelector": {"matchLabels": KUBERAY_OPERATOR}}], "ports": tcp(JOB_API_PORT)},
                # Prometheus, wherever it runs, scrapes the metrics ports (read-only)
                {"from": [any_pod], "ports": tcp(*METRICS_PORTS)},
            ],
            "egress": [{"to": [own_pods]}, *outside_egress(options, stores)],
        },
    }
    return policy


def outside_egress(options: ClusterOptions, stores: tuple[int, ...]) -> list[dict]:
    """Egress beyond the job's own pods, the same for the Ray pods and the launcher (k8s/components patch
    these rules by their place in the list: keep the order)."""
    dns_ports = (DNS_PORT, *options.dns_ports)
    rules = [
        # DNS to whichever resolver the pod uses: kube-dns/CoreDNS, NodeLocal DNSCache's link-local
        # address, OpenShift's resolvers (port 5353: --dns-port 5353)
        {"ports": [{"protocol": protocol, "port": port} for port in dns_ports for protocol in ("UDP", "TCP")]},
        # S3, STS, and the API server of managed clusters (EKS, GKE, AKS) over HTTPS
        {"ports": tcp(HTTPS_PORT)},
        # the API server (autoscaler sidecar, `tlray launch`) where its endpoint is not on 443
        {"ports": tcp(API_SERVER_PORT, *options.api_server_ports)},
        # EKS Pod Identity's credential agent (plain HTTP on the node)
        {"to": [{"ipBlock": {"cidr": cidr}} for cidr in POD_IDENTITY_AGENT], "ports": tcp(80)},
    ]
    if stores:  # an S3-compatible store (MinIO, Ceph) on its own port, wherever it runs: egress_ports()
        rules.append({"ports": tcp(*stores)})
    return rules


def launcher_network_policy(
    name: str, options: ClusterOptions = ClusterOptions(), stores: tuple[int, ...] = ()
) -> dict:
    """The launcher pod: no ingress; egress to DNS, the API server, and the stores its data check reads
    (the dataset listing and latest.json), with the credentials agent. Nothing of Ray's."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-launcher", "labels": labels(name)},
        "spec": {
            "podSelector": {"matchLabels": labels(name, "launcher")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": outside_egress(options, stores),
        },
    }


def spec_config_map(name: str, spec_yaml: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "labels": labels(name)},
        "data": {SPEC_FILE: spec_yaml},
    }


# ---------------------------------------------------------------------------------------
# The CronJob fallback: a plain CronJob runs `tlray launch`, which copies a suspended RayCronJob's
# jobTemplate into a new RayJob. The template is a RayCronJob, not a suspended RayJob: Kueue owns a
# RayJob's `suspend` and would admit (start) the template itself, but it manages no RayCronJobs; and
# KubeRay creates nothing for a suspended RayCronJob (or for any, while its feature gate is off).
# ---------------------------------------------------------------------------------------
def launcher_rbac(name: str, irsa_role_arn: str | None = None) -> list[dict]:
    """The launcher's identity: exactly the API calls `tlray launch` makes (get the template; list, create and
    delete RayJobs), and the same S3 identity as the Ray pods for its read of the data and latest.json (with
    EKS Pod Identity, associate a role with this ServiceAccount too; read-only is enough)."""
    account = service_account(name, irsa_role_arn)
    account["metadata"]["name"] = f"{name}-launcher"
    del account["automountServiceAccountToken"]  # it talks to the API server; the pod says so too
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": f"{name}-launcher", "labels": labels(name)},
        "rules": [
            {
                "apiGroups": ["ray.io"],
                "resources": ["raycronjobs"],
                "resourceNames": [f"{name}-template"],
                "verbs": ["get"],
            },
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": list(LAUNCHER_RAYJOB_VERBS)},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{name}-launcher", "labels": labels(name)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{name}-launcher"},
        "subjects": [{"kind": "ServiceAccount", "name": f"{name}-launcher"}],
    }
    return [account, role, binding]


LAUNCHER_RAYJOB_VERBS = ("list", "create", "delete")  # tlray.k8s.launch: the runs of a template, a new one, pruning


def launcher_command(name: str) -> list[str]:
    """The scheduled pod's command: the data check first, in this small pod, then a RayJob only if it changed."""
    return ["tlray", "launch", f"{name}-template", "--if-data-changed", "--spec", f"{SPEC_DIR}/{SPEC_FILE}"]


def launcher_cron_job(name: str, image: str, schedule: str) -> dict:
    launcher = container("launch", image, 0.25, 0.5)
    launcher["command"] = launcher_command(name)
    # the job spec, from the ConfigMap the runs mount; S3 keys, if any, from the same optional Secret
    launcher["volumeMounts"] = [{"name": "job-spec", "mountPath": f"{SPEC_DIR}/{SPEC_FILE}", "subPath": SPEC_FILE}]
    pod = {
        "metadata": {"labels": labels(name, "launcher")},
        "spec": {
            "serviceAccountName": f"{name}-launcher",
            "automountServiceAccountToken": True,
            "restartPolicy": "Never",
            "securityContext": POD_SECURITY,
            "containers": [launcher],
            "volumes": [{"name": "job-spec", "configMap": {"name": f"{name}-spec"}}],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": f"{name}{names.SCHEDULE_SUFFIX}", "labels": labels(name)},
        "spec": {
            "schedule": schedule,
            "concurrencyPolicy": "Forbid",  # and `tlray launch` skips while the last RayJob still runs
            "startingDeadlineSeconds": 3600,  # a tick missed by more than an hour is skipped, not caught up
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "activeDeadlineSeconds": 600,
                    "ttlSecondsAfterFinished": 86400,
                    "template": pod,
                }
            },
        },
    }


# ---------------------------------------------------------------------------------------
# k8s/: the kustomize base and components, written from one spec (`make manifests`)
# ---------------------------------------------------------------------------------------
GENERATED_FILES = {  # file under k8s/ -> (render kind, kinds of the objects it holds)
    "base/serviceaccount.yaml": ("rayjob", ("ServiceAccount",)),
    "base/networkpolicy.yaml": ("rayjob", ("NetworkPolicy",)),
    "base/rayjob.yaml": ("rayjob", ("RayJob",)),
    "components/raycluster/raycluster.yaml": ("raycluster", ("RayCluster",)),
    "components/raycronjob/raycronjob.yaml": ("raycronjob", ("RayCronJob",)),
    "components/cronjob/cronjob.yaml": (
        "cronjob",
        ("ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "RayCronJob", "CronJob"),
    ),
}
BASE_IMAGE_NAME = "tlray"  # the overlays pin it with kustomize `images:`


def kustomize_files(spec: JobSpec, spec_path: str) -> dict[str, str]:
    """The generated files of k8s/ (the spec ConfigMap itself comes from jobs/kustomization.yaml)."""
    header = (
        f"# Generated by `make manifests` from {spec_path} with tlray/k8s/manifests.py: edit those, not this file.\n"
        "# The overlays (k8s/overlays/*) size, place and pin it.\n"
    )
    files = {}
    for path, (kind, kinds) in GENERATED_FILES.items():
        objects = render(spec, "", BASE_IMAGE_NAME, kind)
        if path.startswith("components/"):  # the base already has the Ray pods' ServiceAccount and policy
            objects = [o for o in objects if o["metadata"]["name"] != f"{spec.name}-ray"]
        files[path] = header + to_yaml([o for o in objects if o["kind"] in kinds])
    return files


def main(argv: list[str] | None = None) -> int:
    """`make manifests`: python -m tlray.k8s SPEC K8S_DIR writes the generated files of k8s/."""
    import sys
    from pathlib import Path

    from tlray.spec import load_spec

    spec_path, root = (argv if argv is not None else sys.argv[1:])[:2]
    for relative, text in kustomize_files(load_spec(spec_path), spec_path).items():
        (Path(root) / relative).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / relative).write_text(text)
        print(f"wrote {Path(root) / relative}")
    return 0
