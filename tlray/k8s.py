"""Kubernetes manifests for a job spec: KubeRay RayJob, RayCluster, RayCronJob, or a CronJob fallback.

One source for `tlray render` and for the files in `k8s/` (`make manifests` writes those from
`jobs/pets-s3.yaml`; a test keeps them in sync). Every pod template gets the same hardening:
Pod Security Standards "restricted", requests = limits, `/dev/shm` in memory for Ray's
object store, S3 credentials from the ServiceAccount (IRSA / EKS Pod Identity) or from an
optional Secret, never a literal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from tlray import models, storage
from tlray.spec import JobSpec

RAY_VERSION = "2.60.0"
SPEC_DIR, SPEC_FILE = "/etc/tlray", "job.yaml"
S3_SECRET = "tlray-s3-credentials"  # optional: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, when IRSA is not available
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of the rayproject/ray images
KINDS = ("rayjob", "raycluster", "raycronjob", "cronjob")
DEFAULT_SCHEDULE = "0 3 * * 1"  # Mondays 03:00
# Terminal RayJob states (status.jobDeploymentStatus): a scheduled run waits for none of these.
FINISHED_STATES = ("Complete", "Failed", "ValidationFailed")
TEMPLATE_LABEL = "tlray.dev/template"  # on RayJobs that `tlray launch` made from a template


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


def entrypoint(spec: JobSpec) -> str:
    """The command a RayJob runs; `ray job submit --working-dir DIR` runs the same one with DIR/job.yaml."""
    return f"tlray {'tune' if spec.tune else 'train'} {SPEC_FILE}"


def render(spec: JobSpec, spec_yaml: str, image: str, kind: str = "rayjob", namespace: str | None = None,
           schedule: str = DEFAULT_SCHEDULE) -> list[dict]:
    """Everything `kubectl apply -f` needs for one spec, in apply order."""
    name, sizing = spec.name, Sizing.of(spec)
    objects = [service_account(name), network_policy(name)]
    if kind != "raycluster":
        objects.append(spec_config_map(name, spec_yaml))
    if kind == "rayjob":
        objects.append(ray_job(name, image, sizing, entrypoint(spec)))
    elif kind == "raycluster":
        objects.append(ray_cluster(name, image, sizing))
    elif kind == "raycronjob":
        objects.append(ray_cron_job(name, image, sizing, entrypoint(spec), schedule))
    elif kind == "cronjob":
        template = ray_job(f"{name}-template", image, sizing, entrypoint(spec), instance=name)
        template["spec"]["suspend"] = True  # a template: KubeRay creates nothing for it
        objects += launcher_rbac(name) + [template, launcher_cron_job(name, image, schedule)]
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = namespace
    return objects


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
    if weights and models.torchvision_weights(spec.model.arch, weights) is None:  # a checkpoint, as build_model decides
        places.append(("model.weights", weights))
    return [
        f"{key}: '{uri}' is a local path; pods on the cluster read and write s3:// URIs"
        for key, uri in places
        if not storage.is_s3(uri)
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
    workers = {
        "groupName": "gpu-workers" if sizing.gpus else "cpu-workers",
        "replicas": 0 if autoscaling else sizing.worker_pods,
        "minReplicas": 0 if autoscaling else sizing.worker_pods,
        "maxReplicas": sizing.worker_pods,
        "rayStartParams": {},
        "template": pod_template(
            instance, "ray-worker", container("ray-worker", image, sizing.cpus, sizing.memory_gib, sizing.gpus), sizing.memory_gib
        ),
    }
    head = pod_template(instance, "ray-head", container("ray-head", image, 2, 8, ports=RAY_HEAD_PORTS), 8)
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


RAY_HEAD_PORTS = [
    {"name": "gcs", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
]


def ray_job(name: str, image: str, sizing: Sizing, command: str, instance: str | None = None) -> dict:
    instance = instance or name
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels(instance)},
        "spec": ray_job_spec(instance, image, sizing, command),
    }


def ray_job_spec(instance: str, image: str, sizing: Sizing, command: str) -> dict:
    return {
        "entrypoint": command,
        # the submitter uploads the mounted spec folder; the driver runs in it (as `ray job submit --working-dir`)
        "runtimeEnvYAML": f"working_dir: {SPEC_DIR}",
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template(instance, image),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": 24 * 3600,
        "backoffLimit": 2,  # a retry resumes from the run's checkpoints in output.uri
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


def ray_cron_job(name: str, image: str, sizing: Sizing, command: str, schedule: str) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {"schedule": schedule, "jobTemplate": ray_job_spec(name, image, sizing, command)},
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
        # static S3 keys only where IRSA / Pod Identity is impossible, from a Secret that may not exist
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        out["ports"] = ports
    return out


def pod_template(instance: str, component: str, main: dict, memory_gib: float) -> dict:
    """A pod of the Ray ServiceAccount around `main`, whose memory limit is `memory_gib`."""
    return {
        "metadata": {"labels": labels(instance, component)},
        "spec": {
            "serviceAccountName": f"{instance}-ray",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [main],
            # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(1, memory_gib // 2):g}Gi"}}],
        },
    }


# ---------------------------------------------------------------------------------------
# Identity, network, spec
# ---------------------------------------------------------------------------------------
def service_account(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": f"{name}-ray",
            "labels": labels(name),
            "annotations": {
                # S3 without static keys. EKS IRSA: the role to assume (EKS Pod Identity instead binds
                # a role to this ServiceAccount with `aws eks create-pod-identity-association`).
                "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/tlray-s3-access",
            },
        },
        "automountServiceAccountToken": False,
    }


def network_policy(name: str) -> dict:
    own_pods = {"podSelector": {"matchLabels": labels(name)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": labels(name)},
        "spec": {
            "podSelector": {"matchLabels": labels(name)},
            "policyTypes": ["Ingress", "Egress"],
            # Ray's ports (GCS, dashboard/job API 8265, object transfer, workers) only among this job's
            # pods: an exposed job API runs anyone's code (CVE-2023-48022, "ShadowRay").
            "ingress": [
                {"from": [own_pods]},
                # the KubeRay operator polls the job API for the RayJob's status
                {
                    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                    "ports": [{"protocol": "TCP", "port": 8265}],
                },
            ],
            "egress": [
                {"to": [own_pods]},
                {
                    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                # S3 (and the Kubernetes API for the autoscaler and `tlray launch`) over HTTPS
                {"ports": [{"protocol": "TCP", "port": 443}]},
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
# The CronJob fallback: a plain CronJob runs `tlray launch`, which copies a suspended RayJob
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
        "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "delete"]}],
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
        "metadata": {"name": f"{name}-schedule", "labels": labels(name)},
        "spec": {
            "schedule": schedule,
            "concurrencyPolicy": "Forbid",  # and `tlray launch` skips while the last RayJob still runs
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {"backoffLimit": 2, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 86400, "template": pod}
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
    "components/cronjob/cronjob.yaml": ("cronjob", ("ServiceAccount", "Role", "RoleBinding", "RayJob", "CronJob")),
}
BASE_IMAGE_NAME = "tlray"  # the overlays pin it with kustomize `images:`


def kustomize_files(spec: JobSpec, spec_path: str) -> dict[str, str]:
    """The generated files of k8s/ (the spec ConfigMap itself comes from jobs/kustomization.yaml)."""
    header = (f"# Generated by `make manifests` from {spec_path} with tlray/k8s.py: edit those, not this file.\n"
              "# The overlays (k8s/overlays/*) size, place and pin it.\n")
    files = {}
    for path, (kind, kinds) in GENERATED_FILES.items():
        objects = render(spec, "", BASE_IMAGE_NAME, kind)
        if path.startswith("components/"):  # the base already has the Ray pods' ServiceAccount
            objects = [o for o in objects if o["metadata"]["name"] != f"{spec.name}-ray" or o["kind"] != "ServiceAccount"]
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
