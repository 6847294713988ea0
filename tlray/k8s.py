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

# RayJob states (status.jobDeploymentStatus) as `tlray launch` sees them: a finished run is pruned, a
# suspended one (Kueue still queueing it, or paused by hand) is replaced by the next scheduled run, and
# any other state means the run is still going, so the next one waits.
FINISHED_STATES = ("Complete", "Failed", "ValidationFailed")
SUSPENDED_STATES = ("Suspending", "Suspended")
TEMPLATE_LABEL = "tlray.dev/template"  # on RayJobs that `tlray launch` made from a template
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# A run's GPUs are released one minute after it ends: KubeRay deletes the whole RayCluster then
# (shutdownAfterJobFinishes); the RayJob and its submitter Job, which holds the logs, stay.
# deletionStrategy rules (workers at once, head later) would need shutdownAfterJobFinishes: false, which
# KubeRay refuses on a suspended RayJob, and Kueue creates every RayJob it manages suspended.
CLUSTER_TTL_SECONDS = 60
# From creation to Running (every pod scheduled, images pulled, job submitted). A run whose GPU workers
# cannot all be placed fails after this instead of holding the head and the placed workers for a day.
# KubeRay does not retry a run that missed a deadline, so backoffLimit does not restart this clock.
PRE_RUNNING_DEADLINE_SECONDS = 30 * 60
ACTIVE_DEADLINE_SECONDS = 24 * 3600
BACKOFF_LIMIT = 2  # a retry resumes from the run's checkpoints in output.uri

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
    queue: str | None = None  # Kueue LocalQueue of the RayJobs / RayCluster


@dataclass(frozen=True)
class Sizing:
    """Worker pods for a spec: one pod per Ray Train worker of each concurrent trial."""

    worker_pods: int
    cpus: int  # per worker pod: the Train worker's CPUs plus one for Ray Data decoding
    gpus: int
    memory_gib: int

    @classmethod
    def of(cls, spec: JobSpec) -> Sizing:
        trials = (spec.tune.max_concurrent_trials or 1) if spec.tune else 1
        gpus = math.ceil(spec.scaling.gpus_per_worker) if spec.scaling.use_gpu else 0
        cpus = math.ceil(spec.scaling.cpus_per_worker) + 1
        return cls(spec.scaling.num_workers * trials, cpus, gpus, 4 * cpus + 12 * gpus)


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
    objects = [service_account(name, options.irsa_role_arn), network_policy(name, options)]
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
        objects += launcher_rbac(name) + [template, launcher_cron_job(name, image, schedule)]
    for obj in objects:
        place(obj, name, options)
        if namespace:
            obj["metadata"]["namespace"] = namespace
    return objects


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


def kind_warnings(kind: str) -> list[str]:
    """What the user should know before relying on a kind."""
    if kind != "raycronjob":
        return []
    return [
        "RayCronJob is alpha (operator feature gate RayCronJob, off by default) and has no concurrency policy, "
        "starting deadline or history limit: after a pause or an operator outage it starts one RayJob per missed "
        "tick, and it keeps every RayJob it creates. For GPU jobs prefer --kind cronjob (see the README)."
    ]


def place(obj: dict, name: str, options: ClusterOptions) -> None:
    """Scheduling choices of the cluster: the Ray pods' PriorityClass and the Kueue queue."""
    if options.priority_class:
        for pod in pod_specs(obj.get("spec", {})):
            if pod.get("serviceAccountName") == f"{name}-ray":  # the Ray pods, not the launcher
                pod["priorityClassName"] = options.priority_class
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
    workers = {
        "groupName": "gpu-workers" if sizing.gpus else "cpu-workers",
        "replicas": 0 if autoscaling else sizing.worker_pods,
        "minReplicas": 0 if autoscaling else sizing.worker_pods,
        "maxReplicas": sizing.worker_pods,
        "rayStartParams": {},
        "template": pod_template(instance, "ray-worker", worker, sizing.memory_gib, DO_NOT_DISRUPT),
    }
    head_container = container("ray-head", image, 2, 8, ports=RAY_HEAD_PORTS)
    head = pod_template(instance, "ray-head", head_container, 8, DO_NOT_DISRUPT)
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


def network_policy(name: str, options: ClusterOptions = ClusterOptions()) -> dict:
    """Ray's ports (GCS, job API 8265, object transfer, workers) only among this job's pods: an exposed job
    API runs anyone's code (CVE-2023-48022, "ShadowRay"). Egress rules are matched after Service addresses
    are rewritten (Calico, Cilium, kube-router), so they name the ports the endpoints listen on."""
    own_pods = {"podSelector": {"matchLabels": labels(name)}}
    any_pod = {"namespaceSelector": {}}
    dns_ports = (DNS_PORT, *options.dns_ports)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": labels(name)},
        "spec": {
            "podSelector": {"matchLabels": labels(name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [own_pods]},
                # the KubeRay operator polls the job API for the RayJob's status (any install, any namespace)
                {"from": [{**any_pod, "podSelector": {"matchLabels": KUBERAY_OPERATOR}}], "ports": tcp(JOB_API_PORT)},
                # Prometheus, wherever it runs, scrapes the metrics ports (read-only)
                {"from": [any_pod], "ports": tcp(*METRICS_PORTS)},
            ],
            "egress": [
                {"to": [own_pods]},
                # DNS to whichever resolver the pod uses: kube-dns/CoreDNS, NodeLocal DNSCache's link-local
                # address, OpenShift's resolvers (port 5353: --dns-port 5353)
                {"ports": [{"protocol": protocol, "port": port} for port in dns_ports for protocol in ("UDP", "TCP")]},
                # S3, STS, and the API server of managed clusters (EKS, GKE, AKS) over HTTPS
                {"ports": tcp(HTTPS_PORT)},
                # the API server (autoscaler sidecar, `tlray launch`) where its endpoint is not on 443
                {"ports": tcp(API_SERVER_PORT, *options.api_server_ports)},
                # EKS Pod Identity's credential agent (plain HTTP on the node)
                {"to": [{"ipBlock": {"cidr": cidr}} for cidr in POD_IDENTITY_AGENT], "ports": tcp(80)},
            ],
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
def launcher_rbac(name: str) -> list[dict]:
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": f"{name}-launcher", "labels": labels(name)},
    }
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
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "delete"]},
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


def launcher_cron_job(name: str, image: str, schedule: str) -> dict:
    launcher = container("launch", image, 0.25, 0.5)
    launcher["command"] = ["tlray", "launch", f"{name}-template"]
    del launcher["envFrom"], launcher["volumeMounts"]  # it only talks to the API server
    pod = {
        "metadata": {"labels": labels(name, "launcher")},
        "spec": {
            "serviceAccountName": f"{name}-launcher",
            "automountServiceAccountToken": True,
            "restartPolicy": "Never",
            "securityContext": POD_SECURITY,
            "containers": [launcher],
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
    "components/cronjob/cronjob.yaml": ("cronjob", ("ServiceAccount", "Role", "RoleBinding", "RayCronJob", "CronJob")),
}
BASE_IMAGE_NAME = "tlray"  # the overlays pin it with kustomize `images:`


def kustomize_files(spec: JobSpec, spec_path: str) -> dict[str, str]:
    """The generated files of k8s/ (the spec ConfigMap itself comes from jobs/kustomization.yaml)."""
    header = (
        f"# Generated by `make manifests` from {spec_path} with tlray/k8s.py: edit those, not this file.\n"
        "# The overlays (k8s/overlays/*) size, place and pin it.\n"
    )
    files = {}
    for path, (kind, kinds) in GENERATED_FILES.items():
        objects = render(spec, "", BASE_IMAGE_NAME, kind)
        if path.startswith("components/"):  # the base already has the Ray pods' ServiceAccount
            objects = [
                o for o in objects if o["metadata"]["name"] != f"{spec.name}-ray" or o["kind"] != "ServiceAccount"
            ]
        files[path] = header + to_yaml([o for o in objects if o["kind"] in kinds])
    return files


if __name__ == "__main__":  # make manifests: python -m tlray.k8s SPEC K8S_DIR
    import sys
    from pathlib import Path

    from tlray.spec import load_spec

    spec_path, root = sys.argv[1], Path(sys.argv[2])
    for relative, text in kustomize_files(load_spec(spec_path), spec_path).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
        print(f"wrote {root / relative}")
