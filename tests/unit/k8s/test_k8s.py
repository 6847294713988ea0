"""The Kubernetes side, checked offline for real: every kustomize overlay (with each optional
component) and `tlray render` output is rendered, validated against the KubeRay v1.7.0 CRD
schemas (unknown fields are errors) and the core Kubernetes schemas (`kubernetes-validate
--strict`), and every pod template in it is walked for the restricted security fields."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tlray.cli import main
from tlray.k8s import manifests as k8s
from tlray.spec import load_spec

from conftest import ROOT

KUBERAY_CRDS = Path(os.environ.get("TLRAY_KUBERAY_CRDS", ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()  # the newest the package knows
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
OVERLAYS = ("cpu-dev", "gpu-prod")
MODES = (None, "raycluster", "raycronjob", "cronjob")  # None: the overlay as shipped (one RayJob)
# k8s/components that fit the manifests to a cluster, each with the `tlray render` flags that do the same
CLUSTER_COMPONENTS = {
    "apiserver-8443": ("--api-server-port", "8443"),
    "openshift-dns": ("--dns-port", "5353"),
    "irsa": ("--irsa-role-arn", "arn:aws:iam::111122223333:role/tlray-s3-access"),
    "priority-class": ("--priority-class", "tlray-training"),
    "kueue": ("--queue", "tlray"),
    "egress-port": ("--egress-port", "9000"),
    "gpu-node-selector": ("--node-selector", "karpenter.k8s.aws/instance-gpu-name=l4"),
}
SECRET_NAME_HINTS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL")

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl renders the kustomize overlays: apt-get install -y kubectl"
)


# ---------------------------------------------------------------------------------------
# What is checked
# ---------------------------------------------------------------------------------------
def kustomize(overlay: str, mode: str | None, workdir: Path, *components: str) -> list[dict]:
    """`kubectl kustomize` of an overlay, with the mode's and the other components uncommented as it says."""
    root = ROOT
    components = tuple(c for c in (mode, *components) if c)
    if components:
        for folder in ("k8s", "jobs"):
            shutil.copytree(ROOT / folder, workdir / folder)
        kustomization = workdir / "k8s" / "overlays" / overlay / "kustomization.yaml"
        text = kustomization.read_text().replace("# components:", "components:")
        for component in components:
            assert f"# - ../../components/{component} " in text, "the overlay lists the component to uncomment"
            text = text.replace(f"# - ../../components/{component} ", f"- ../../components/{component} ")
        kustomization.write_text(text)
        root = workdir
    done = subprocess.run(
        ["kubectl", "kustomize", str(root / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def rendered(capsys, spec: Path, *args: str) -> list[dict]:
    return rendered_and_said(capsys, spec, *args)[0]


def rendered_and_said(capsys, spec: Path, *args: str) -> tuple[list[dict], str]:
    """The objects `tlray render` prints, and what it says on stderr."""
    assert main(["render", str(spec), "--image", "registry.example.com/tlray:1.0", *args]) == 0
    out, err = capsys.readouterr()
    return [o for o in yaml.safe_load_all(out) if o], err


@cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((KUBERAY_CRDS / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def closed(schema: dict) -> dict:
    """The API server prunes fields its schema does not declare; here they are errors instead."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            if isinstance(value, dict):
                closed(value)
            elif isinstance(value, list):
                for item in value:
                    closed(item)
    return schema


def check_against_crd(obj: dict) -> None:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(
            f"KubeRay v1.7.0 CRDs not found in {KUBERAY_CRDS}: set TLRAY_KUBERAY_CRDS to a folder with "
            "ray.io_{rayjobs,rayclusters,raycronjobs}.yaml (ray-operator/config/crd/bases of a KubeRay release, "
            "or `kubectl get crd rayjobs.ray.io -o yaml`)"
        )
    errors = sorted(jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj), key=str)
    assert not errors, f"{obj['kind']} {obj['metadata']['name']}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )


def check_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def pod_templates(node, path: str = ""):
    """Every pod template spec, however deep (RayJob head/workers/submitter, RayCronJob, CronJob)."""
    if isinstance(node, dict):
        if "containers" in node and isinstance(node["containers"], list):
            yield path, node
        for key, value in node.items():
            yield from pod_templates(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_templates(value, f"{path}/{i}")


def check_pod(where: str, pod: dict) -> None:
    security = pod.get("securityContext", {})
    assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
    assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{where}: seccompProfile"
    for c in pod["containers"] + pod.get("initContainers", []):
        name = f"{where} container {c['name']}"
        context = c.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities.drop"
        assert not context.get("privileged"), name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), f"{name}: resources.{bound}"
        assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{name}: image pinned ({c['image']})"
        for env in c.get("env", []):
            if any(hint in env["name"].upper() for hint in SECRET_NAME_HINTS):
                assert "value" not in env, f"{name}: {env['name']} is a literal; use valueFrom.secretKeyRef"
    if any(c["name"].startswith("ray-") and c["name"] != "ray-job-submitter" for c in pod["containers"]):
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"]), (
            f"{where}: /dev/shm"
        )


def check_all(objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] in CRD_FILES:
            check_against_crd(obj)
        else:
            check_core(obj)
        for where, pod in pod_templates(obj.get("spec", {})):
            check_pod(f"{obj['kind']} {obj['metadata']['name']}{where}", pod)
            # the nested templates against the core PodTemplate schema too
            check_core(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod}}
            )
        assert obj["kind"] != "Secret", "no Secret objects (and so no literal keys) in the manifests"


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def worker_group(rayjob_or_cluster: dict) -> dict:
    spec = rayjob_or_cluster["spec"]
    spec = spec.get("jobTemplate", spec)
    return spec.get("rayClusterSpec", spec)["workerGroupSpecs"][0]


# ---------------------------------------------------------------------------------------
# k8s/: every overlay, with every optional component
# ---------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m or "rayjob")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, mode, tmp_path):
    objects = kustomize(overlay, mode, tmp_path)
    check_all(objects)
    namespace = by_kind(objects, "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        o["metadata"].get("namespace") == namespace["metadata"]["name"] for o in objects if o["kind"] != "Namespace"
    )
    assert by_kind(objects, "NetworkPolicy") and by_kind(objects, "ServiceAccount")

    rayjobs = by_kind(objects, "RayJob")
    if mode is None:
        (job,) = rayjobs
        spec = job["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == k8s.CLUSTER_TTL_SECONDS
        # every attempt (KubeRay retries a missed preRunningDeadlineSeconds) adds its deadline: 30 minutes in all
        assert (spec["backoffLimit"] + 1) * spec["preRunningDeadlineSeconds"] == 1800
        assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        assert spec["entrypoint"].startswith("tlray tune job.yaml")
        config_map = by_kind(objects, "ConfigMap")[0]
        volumes = spec["submitterPodTemplate"]["spec"]["volumes"]
        assert {"name": "job-spec", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
        assert config_map["data"]["job.yaml"] == (ROOT / "jobs" / "pets-s3.yaml").read_text()
    elif mode == "cronjob":
        assert not rayjobs, "the template is a suspended RayCronJob, which Kueue does not manage"
        (template,) = by_kind(objects, "RayCronJob")
        assert template["spec"]["suspend"] is True and template["metadata"]["name"] == "pets-template"
        (cron,) = by_kind(objects, "CronJob")
        assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["startingDeadlineSeconds"] > 0
        assert cron["spec"]["successfulJobsHistoryLimit"] and cron["spec"]["failedJobsHistoryLimit"]
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        # the data check runs in this pod, on the spec the runs mount, before any Ray cluster exists
        assert pod["containers"][0]["command"] == [
            *("tlray", "launch", "pets-template", "--if-data-changed", "--spec", "/etc/tlray/job.yaml")
        ]
        assert {"name": "job-spec", "configMap": {"name": "pets-spec"}} in pod["volumes"]
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": k8s.S3_SECRET, "optional": True}}]
        (role,) = by_kind(objects, "Role")
        assert role["rules"] == [  # exactly the calls tlray.k8s.launch makes
            {
                "apiGroups": ["ray.io"],
                "resources": ["raycronjobs"],
                "resourceNames": ["pets-template"],
                "verbs": ["get"],
            },
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["list", "create", "delete"]},
        ]
        launcher_policy = next(p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "pets-launcher")
        assert launcher_policy["spec"]["ingress"] == [] and launcher_policy["spec"]["podSelector"] == {
            "matchLabels": k8s.labels("pets", "launcher")
        }
        (binding,) = by_kind(objects, "RoleBinding")
        assert binding["subjects"][0] == {
            "kind": "ServiceAccount",
            "name": pod["serviceAccountName"],
            "namespace": cron["metadata"]["namespace"],
        }
    else:
        assert not rayjobs, "a mode replaces the one-off RayJob"
    if mode == "raycluster":
        (cluster,) = by_kind(objects, "RayCluster")
        assert cluster["spec"]["enableInTreeAutoscaling"] is True and worker_group(cluster)["minReplicas"] == 0

    ray_objects = [o for o in objects if o["kind"] in CRD_FILES]
    for obj in ray_objects:
        group = worker_group(obj)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if overlay == "gpu-prod":
            assert limits["nvidia.com/gpu"] == "1" and group["maxReplicas"] == 4
            # placed by the GPU request and the taint's toleration: no label that exists only after a node joins
            assert group["template"]["spec"]["tolerations"] == [k8s.GPU_TOLERATION]
            assert "nodeSelector" not in group["template"]["spec"]
        else:
            assert "nvidia.com/gpu" not in limits and group["maxReplicas"] == 1
            assert "tolerations" not in group["template"]["spec"]
            if obj["kind"] != "RayCluster":
                entrypoint = (obj["spec"].get("jobTemplate") or obj["spec"])["entrypoint"]
                assert "--set scaling.use_gpu=false" in entrypoint


def egress_ports(policy: dict) -> dict[str, set[tuple[str, int]]]:
    """(protocol, port) pairs each egress rule opens, keyed by where to: "anywhere", "own pods" or CIDRs."""
    out: dict[str, set[tuple[str, int]]] = {}
    for rule in policy["spec"]["egress"]:
        peers = rule.get("to") or []
        if not peers:
            where = "anywhere"
        elif "podSelector" in peers[0]:
            where = "own pods"
        else:
            where = ",".join(peer["ipBlock"]["cidr"] for peer in peers)
        out.setdefault(where, set()).update((p["protocol"], p["port"]) for p in rule.get("ports", []))
    return out


def test_network_policy_keeps_the_job_api_inside():
    policy = k8s.network_policy("pets")
    own = {"podSelector": k8s.ray_pods("pets")}  # this job's Ray pods, not its launcher
    assert own["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["launcher"]}
    ]
    assert policy["spec"]["podSelector"] == own["podSelector"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    opened = {}
    for rule in policy["spec"]["ingress"]:
        if rule["from"] == [own]:
            continue  # Ray's ports among the job's own pods
        for port in rule["ports"]:
            opened[port["port"]] = rule["from"]
    # The job API only to the KubeRay operator, by the label both its Helm chart and its kustomize install set
    # (app.kubernetes.io/name is "kuberay-operator" only for a default Helm install).
    assert opened[8265] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}
    ]
    # Prometheus, from any namespace, to the metrics ports only
    assert set(opened) == {8265, 8080, 44217, 44227} and opened[8080] == [{"namespaceSelector": {}}]


def test_network_policy_egress_fits_real_clusters():
    egress = egress_ports(k8s.network_policy("pets"))
    anywhere = egress["anywhere"]
    # DNS to any resolver: kube-dns/CoreDNS under any label, NodeLocal DNSCache's link-local address
    assert {("UDP", 53), ("TCP", 53)} <= anywhere
    # policies see the endpoint's port: 443 on EKS/GKE/AKS, 6443 on kind, kubeadm, k3s
    assert {("TCP", 443), ("TCP", 6443)} <= anywhere
    assert egress["169.254.170.23/32,fd00:ec2::23/128"] == {("TCP", 80)}  # EKS Pod Identity's agent
    minikube_openshift = egress_ports(k8s.network_policy("pets", k8s.ClusterOptions((8443,), (5353,))))
    assert {("TCP", 8443), ("UDP", 5353), ("TCP", 5353)} <= minikube_openshift["anywhere"]


def test_pod_identity_by_default_irsa_by_choice():
    assert "annotations" not in k8s.service_account("pets")["metadata"], "an IRSA annotation shadows Pod Identity"
    irsa = k8s.service_account("pets", "arn:aws:iam::1:role/r")
    assert irsa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}


@needs_kubectl
@pytest.mark.parametrize("mode", [None, "cronjob"], ids=lambda m: m or "rayjob")
@pytest.mark.parametrize("component", CLUSTER_COMPONENTS)
def test_cluster_components_do_what_the_render_flags_do(component, mode, tmp_path, capsys):
    """Each k8s/components/<choice> is one line in an overlay and makes the same change as its render flag."""
    objects = kustomize("gpu-prod", mode, tmp_path, component)
    check_all(objects)
    flags = ("--kind", mode or "rayjob", *CLUSTER_COMPONENTS[component])
    expected = rendered(capsys, ROOT / "jobs" / "pets-s3.yaml", *flags)
    for kind in ("NetworkPolicy", "ServiceAccount"):  # the Ray pods' and, with cronjob, the launcher's
        ours = {o["metadata"]["name"]: o for o in by_kind(objects, kind)}
        theirs = {o["metadata"]["name"]: o for o in by_kind(expected, kind)}
        assert set(ours) == set(theirs)
        for name, obj in theirs.items():
            assert ours[name].get("spec") == obj.get("spec"), name
            assert ours[name]["metadata"].get("annotations") == obj["metadata"].get("annotations"), name
    for got, want in zip(scheduling(objects), scheduling(expected), strict=True):
        assert got == want
    if component == "priority-class":
        assert {"tlray-training"} == {p for _, _, classes, _ in scheduling(objects) for p in classes}
    if component == "kueue":
        assert {"tlray"} == {queue for _, queue, _, _ in scheduling(objects)}
    if component == "gpu-node-selector":
        assert {(("karpenter.k8s.aws/instance-gpu-name", "l4"),)} == {s for *_, s in scheduling(objects)}
    if component == "egress-port":
        for policy in by_kind(objects, "NetworkPolicy"):
            assert policy["spec"]["egress"][-1] == {"ports": [{"protocol": "TCP", "port": 9000}]}


def scheduling(objects: list[dict]) -> list[tuple]:
    """(kind, Kueue queue, PriorityClasses of the Ray pods, the workers' node selector) of each Ray object."""
    return [
        (
            o["kind"],
            o["metadata"]["labels"].get(k8s.KUEUE_QUEUE_LABEL),
            {p.get("priorityClassName") for p in k8s.pod_specs(o)},
            tuple(worker_group(o)["template"]["spec"].get("nodeSelector", {}).items()),
        )
        for o in objects
        if o["kind"] in CRD_FILES
    ]


def test_runs_release_their_gpus_and_give_up_when_unschedulable():
    job = k8s.ray_job("pets", "img:1", k8s.Sizing(4, 9, 1, 48), "tlray tune job.yaml")["spec"]
    # the whole cluster goes a minute after the run (the submitter Job, with the logs, stays with the RayJob)
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] <= 60
    # deletionRules need shutdownAfterJobFinishes: false, which KubeRay refuses on a suspended (Kueue) RayJob
    assert "deletionStrategy" not in job
    # KubeRay retries a missed preRunningDeadlineSeconds (only DeadlineExceeded and JobStatusCheckTimeoutExceeded
    # are final) and restarts its clock each time: workers that cannot all be placed hold what they got for
    # (backoffLimit + 1) x the deadline, 30 minutes, not three times the deadline nor the 24 h active deadline
    attempts = job["backoffLimit"] + 1
    assert (attempts, job["preRunningDeadlineSeconds"]) == (3, 600)
    assert attempts * job["preRunningDeadlineSeconds"] == k8s.UNPLACEABLE_HOLD_SECONDS == 1800
    assert job["activeDeadlineSeconds"] == 86400
    assert "30 minutes" in (ROOT / "README.md").read_text().split("## Run on Kubernetes")[1]
    cron = k8s.ray_cron_job("pets", "img:1", k8s.Sizing(4, 9, 1, 48), "tlray tune job.yaml", "0 3 * * 1")
    assert cron["spec"]["jobTemplate"] == job


def test_ray_pods_are_protected_from_consolidation_and_can_be_prioritised(tmp_path, capsys):
    objects = rendered(capsys, ROOT / "jobs" / "pets-s3.yaml", "--priority-class", "batch-high", "--queue", "gpu")
    (job,) = by_kind(objects, "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["metadata"]["annotations"] == {
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
            "karpenter.sh/do-not-disrupt": "true",
        }
    assert {p.get("priorityClassName") for p in k8s.pod_specs(job)} == {"batch-high"}  # head, workers, submitter
    assert job["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "gpu"
    cron = rendered(capsys, ROOT / "jobs" / "pets-s3.yaml", "--kind", "cronjob", "--priority-class", "batch-high")
    (launcher,) = by_kind(cron, "CronJob")
    assert "priorityClassName" not in launcher["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # a 10 s pod


def test_render_refuses_a_queue_a_raycronjob_cannot_pass_on(capsys):
    pets = str(ROOT / "jobs" / "pets-s3.yaml")
    assert main(["render", pets, "--image", "t:1", "--kind", "raycronjob", "--queue", "q"]) == 2
    assert "cannot label the RayJobs it creates" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Names: every name derived from a job name fits KubeRay's and Kubernetes' limits
# ---------------------------------------------------------------------------------------
def named(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name[:8]}.yaml"
    path.write_text((ROOT / "jobs" / "pets-s3.yaml").read_text().replace("name: pets", f"name: {name}"))
    return path


def test_the_name_limit_leaves_room_for_every_derived_name(tmp_path, capsys):
    from tlray import names

    assert names.MAX_NAME_LENGTH == 41  # RayJob limit 47 = 53 (RayCluster) - 6, minus "-" + 5 of generateName
    name = "a" * names.MAX_NAME_LENGTH
    for kind in ("rayjob", "raycluster", "cronjob"):
        for obj in rendered(capsys, named(tmp_path, name), "--kind", kind):
            check_all([obj])
            limit = {"RayJob": 47, "RayCluster": 53, "CronJob": 52}.get(obj["kind"], 253)
            assert len(obj["metadata"]["name"]) <= limit, obj["metadata"]["name"]
            assert len(obj["metadata"]["labels"]["app.kubernetes.io/instance"]) <= 63
    from tlray.k8s.launch import run_from_template

    (template,) = [o for o in rendered(capsys, named(tmp_path, name), "--kind", "cronjob") if o["kind"] == "RayCronJob"]
    assert len(run_from_template(template)["metadata"]["generateName"]) + 5 == 47  # each scheduled run


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a" * 42, "has 42 characters; at most 41"),
        ("9lives", "not a DNS-1035 label"),  # RayJob names must start with a letter
        ("pets-", "not a DNS-1035 label"),
        ("Pets", "not a DNS-1035 label"),
    ],
)
def test_the_spec_refuses_names_kuberay_would_refuse(name, problem, tmp_path, capsys):
    assert main(["validate", str(named(tmp_path, name))]) == 2
    assert problem in capsys.readouterr().err


def test_raycronjob_refuses_a_name_over_kuberays_limit_naming_it(tmp_path, capsys):
    assert main(["render", str(named(tmp_path, "a" * 37)), "--image", "t:1", "--kind", "raycronjob"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "KubeRay v1.7 refuses RayCronJob names over 36 (MaxRayCronJobNameLength)" in err
    assert "'" + "a" * 37 + "' has 37 characters" in err and "--kind cronjob" in err
    assert rendered(capsys, named(tmp_path, "a" * 36), "--kind", "raycronjob")
    assert rendered(capsys, named(tmp_path, "a" * 41), "--kind", "cronjob")


def test_generated_manifests_are_in_sync_with_tlray_k8s():
    """k8s/base and k8s/components come from tlray/k8s/manifests.py: run `make manifests` after changing it."""
    spec_path = "jobs/pets-s3.yaml"
    for relative, text in k8s.kustomize_files(load_spec(ROOT / spec_path), spec_path).items():
        assert (ROOT / "k8s" / relative).read_text() == text, f"k8s/{relative} is stale: run `make manifests`"


def test_crd_check_rejects_a_field_the_schema_lacks():
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found in {KUBERAY_CRDS} (set TLRAY_KUBERAY_CRDS)")
    job = k8s.ray_job("x", "img:1", k8s.Sizing(1, 2, 0, 8), "tlray train job.yaml")
    check_against_crd(job)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt: the API server would drop it
    with pytest.raises(AssertionError, match="replica"):
        check_against_crd(job)


# ---------------------------------------------------------------------------------------
# tlray render
# ---------------------------------------------------------------------------------------
def cpu_spec(tmp_path: Path) -> Path:
    path = tmp_path / "cpu.yaml"
    path.write_text(
        (ROOT / "jobs" / "digits.yaml")
        .read_text()
        .replace("uri: data/digits", "uri: s3://bucket/digits")
        .replace("uri: outputs", "uri: s3://bucket/runs")
    )
    return path


@pytest.mark.parametrize("kind", k8s.KINDS)
def test_render_cpu_only_spec(kind, tmp_path, capsys):
    objects = rendered(capsys, cpu_spec(tmp_path), "--kind", kind, "--namespace", "ml")
    check_all(objects)
    assert all(o["metadata"]["namespace"] == "ml" for o in objects)
    for obj in by_kind(objects, "RayJob") + by_kind(objects, "RayCronJob") + by_kind(objects, "RayCluster"):
        group = worker_group(obj)
        assert group["maxReplicas"] == 2 and group["groupName"] == "cpu-workers"  # scaling.num_workers
        assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if kind != "raycluster":
        (config_map,) = by_kind(objects, "ConfigMap")
        embedded = tmp_path / "embedded.yaml"
        embedded.write_text(config_map["data"]["job.yaml"])
        assert load_spec(embedded) == load_spec(cpu_spec(tmp_path))


def test_render_multi_gpu_tune_spec(capsys):
    objects = rendered(
        capsys,
        ROOT / "jobs" / "pets-s3.yaml",
        "--set",
        "scaling.num_workers=4",
        "--set",
        "scaling.gpus_per_worker=1",
        "--set",
        "tune.max_concurrent_trials=3",
    )
    check_all(objects)
    (job,) = by_kind(objects, "RayJob")
    group = worker_group(job)
    assert group["replicas"] == group["maxReplicas"] == 12  # 3 trials x 4 workers
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["entrypoint"] == "tlray tune job.yaml"
    embedded = yaml.safe_load(by_kind(objects, "ConfigMap")[0]["data"]["job.yaml"])
    assert embedded["scaling"]["num_workers"] == 4 and embedded["tune"]["max_concurrent_trials"] == 3


@pytest.mark.parametrize("kind", ["raycronjob", "cronjob"])
def test_render_scheduled(kind, capsys):
    objects = rendered(capsys, ROOT / "jobs" / "pets-s3.yaml", "--kind", kind, "--schedule", "30 1 * * *")
    check_all(objects)
    scheduled = by_kind(objects, "RayCronJob" if kind == "raycronjob" else "CronJob")[0]
    assert scheduled["spec"]["schedule"] == "30 1 * * *"


def test_render_warns_about_local_paths_and_refuses_a_bad_spec(tmp_path, capsys):
    assert main(["render", str(ROOT / "jobs" / "digits.yaml"), "--image", "tlray:1"]) == 0
    err = capsys.readouterr().err
    assert "dataset.uri: 'data/digits' is a local path" in err and "output.uri" in err
    assert "model.weights" not in err  # `none`: random init, nothing to read
    assert main(["render", str(ROOT / "jobs" / "digits-new-domain.yaml"), "--image", "tlray:1"]) == 0
    assert "model.weights: 'data/digits-pretrain.pt' is a local path" in capsys.readouterr().err
    assert main(["render", str(ROOT / "jobs" / "pets-s3.yaml"), "--image", "tlray:1"]) == 0
    assert capsys.readouterr().err == ""  # s3:// data and output, torchvision weights by name
    assert main(["render", str(ROOT / "jobs" / "digits.yaml"), "--image", "tlray:1", "--set", "train.epochs=0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "train.epochs" in err


def test_the_cpu_dev_overlays_scaled_down_search_is_a_valid_spec():
    """Its entrypoints shrink jobs/pets-s3.yaml with --set: the result must pass `tlray validate` (a search
    needs a trial per tune.freeze_depth choice)."""
    import shlex

    for name in ("rayjob.yaml", "raycronjob.yaml"):
        (patch,) = yaml.safe_load((ROOT / "k8s" / "overlays" / "cpu-dev" / name).read_text())[:1]
        words = shlex.split(patch["value"])
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        spec = load_spec(ROOT / "jobs" / "pets-s3.yaml", overrides)
        assert (spec.tune.num_samples, spec.trial_choices, spec.scaling.use_gpu) == (2, [1, 4], False), name


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu-prod"])
def test_scheduled_runs_retrain_only_when_the_data_changed(overlay, tmp_path, capsys):
    pets = ROOT / "jobs" / "pets-s3.yaml"
    entrypoints = {
        kind: [
            o["spec"].get("entrypoint") or o["spec"]["jobTemplate"]["entrypoint"]
            for o in rendered(capsys, pets, "--kind", kind)
            if o["kind"] in ("RayJob", "RayCronJob")
        ]
        for kind in ("rayjob", "raycronjob", "cronjob")
    }
    assert entrypoints == {
        "rayjob": ["tlray tune job.yaml"],  # one run on demand: it always trains
        "raycronjob": ["tlray tune job.yaml --if-data-changed"],
        "cronjob": ["tlray tune job.yaml --if-data-changed"],  # the template that `tlray launch` copies
    }
    for mode in ("raycronjob", "cronjob"):
        (scheduled,) = by_kind(kustomize(overlay, mode, tmp_path / mode), "RayCronJob")
        assert scheduled["spec"]["jobTemplate"]["entrypoint"].startswith("tlray tune job.yaml --if-data-changed")


# ---------------------------------------------------------------------------------------
# What real clusters do: stores on their own ports, Kueue, preemption, disks, GPU placement
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "opened"),
    [
        ("http://minio.storage:9000", 9000),
        ("http://ceph-rgw.storage", 80),  # http without a port: 80
        ("https://s3.example.com:8443", 8443),
        ("https://s3.example.com", None),  # https without a port: 443, open already
    ],
)
@pytest.mark.parametrize("kind", ["rayjob", "cronjob"])
def test_render_opens_egress_to_the_store_the_spec_names(endpoint, opened, kind, capsys):
    objects, err = rendered_and_said(
        capsys, ROOT / "jobs" / "pets-s3.yaml", "--kind", kind, "--set", f"dataset.endpoint_url={endpoint}"
    )
    check_all(objects)
    policies = by_kind(objects, "NetworkPolicy")
    assert len(policies) == (2 if kind == "cronjob" else 1)  # the launcher reads the store too
    for policy in policies:
        anywhere = egress_ports(policy)["anywhere"]
        if opened:
            assert ("TCP", opened) in anywhere, policy["metadata"]["name"]
            assert policy["spec"]["egress"][-1] == {"ports": [{"protocol": "TCP", "port": opened}]}
        else:
            assert anywhere == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443)}
    if opened:
        assert f"egress to TCP {opened} opened for dataset.endpoint_url {endpoint}" in err
    else:
        assert f"dataset.endpoint_url {endpoint} is on 443, which is open already" in err


def test_render_egress_port_flag_opens_more_and_says_so(capsys):
    pets = ROOT / "jobs" / "pets-s3.yaml"
    objects, err = rendered_and_said(
        capsys, pets, "--egress-port", "5000", "--set", "dataset.endpoint_url=http://minio:9000"
    )
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["egress"][-1] == {
        "ports": [{"protocol": "TCP", "port": 9000}, {"protocol": "TCP", "port": 5000}]
    }
    assert "egress to TCP 9000 opened for dataset.endpoint_url http://minio:9000" in err
    assert "egress to TCP 5000 opened for --egress-port" in err
    assert main(["render", str(pets), "--image", "t:1", "--node-selector", "no-value"]) == 2
    assert "--node-selector: 'no-value' is not LABEL=VALUE" in capsys.readouterr().err


def test_render_opens_egress_to_the_tracking_server_the_spec_names(capsys, monkeypatch):
    pets = ROOT / "jobs" / "pets-s3.yaml"
    tracked = (
        "--set",
        "tracking.mlflow.uri=http://mlflow.tracking:5000",
        "--set",
        "dataset.endpoint_url=http://m:9000",
    )
    objects, err = rendered_and_said(capsys, pets, "--kind", "cronjob", *tracked)
    check_all(objects)
    for policy in by_kind(objects, "NetworkPolicy"):
        assert policy["spec"]["egress"][-1] == {
            "ports": [{"protocol": "TCP", "port": 9000}, {"protocol": "TCP", "port": 5000}]
        }
    assert "egress to TCP 5000 opened for tracking.mlflow.uri http://mlflow.tracking:5000" in err
    _, err = rendered_and_said(capsys, pets, "--set", "tracking.mlflow.uri=https://mlflow.example.com")
    assert "tracking.mlflow.uri https://mlflow.example.com is on 443, which is open already" in err
    # a server named only by this machine's environment is not the pods': nothing is opened for it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    objects, err = rendered_and_said(capsys, pets, "--set", "tracking.mlflow.log_weights=true")
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert ("TCP", 5000) not in egress_ports(policy)["anywhere"]
    assert "tracking.mlflow" not in err


def test_kueue_never_gets_an_autoscaling_raycluster(tmp_path, capsys):
    pets = str(ROOT / "jobs" / "pets-s3.yaml")
    assert main(["render", pets, "--image", "t:1", "--kind", "raycluster", "--queue", "q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "a kueue managed job should not use autoscaling" in err and "--kind rayjob" in err
    objects = kustomize("gpu-prod", "raycluster", tmp_path, "kueue")
    (cluster,) = by_kind(objects, "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert k8s.KUEUE_QUEUE_LABEL not in cluster["metadata"]["labels"], "the kueue component leaves it unqueued"


def test_raycronjob_warns_that_it_starts_the_cluster_every_tick(capsys):
    _, err = rendered_and_said(capsys, ROOT / "jobs" / "pets-s3.yaml", "--kind", "raycronjob")
    assert "starts the whole Ray cluster, GPU workers included, at every tick" in err and "--kind cronjob" in err


@pytest.mark.parametrize("kind", ["rayjob", "raycluster", "raycronjob", "cronjob"])
def test_the_head_forwards_sigterm_to_the_driver_and_the_cache_has_a_volume(kind, capsys):
    budget = 20
    objects = rendered(
        capsys, ROOT / "jobs" / "pets-s3.yaml", "--kind", kind, "--set", f"train.cache_budget_gb={budget}"
    )
    (ray,) = [o for o in objects if o["kind"] in CRD_FILES]
    spec = ray["spec"].get("jobTemplate", ray["spec"])
    cluster = spec.get("rayClusterSpec", spec)
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["lifecycle"] == {"preStop": {"exec": {"command": k8s.PRESTOP_COMMAND}}}
    assert k8s.PRESTOP_COMMAND == ["python", "-m", "tlray.prestop", "--wait", "90"]
    # the hook's wait, then the kubelet's SIGTERM (ignored by bash) and the SIGKILL
    assert head["terminationGracePeriodSeconds"] == 120 > k8s.PRESTOP_WAIT_SECONDS
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert "terminationGracePeriodSeconds" not in worker and "lifecycle" not in worker["containers"][0]
    for pod in (head, worker):
        main_container = pod["containers"][0]
        assert {"name": "TLRAY_CACHE_DIR", "value": "/var/cache/tlray"} in main_container["env"]
        assert {"name": "tlray-cache", "mountPath": "/var/cache/tlray"} in main_container["volumeMounts"]
        # the budget plus a quarter: the entry being written, rounded up to GiB
        assert {"name": "tlray-cache", "emptyDir": {"sizeLimit": "25Gi"}} in pod["volumes"]


def test_only_an_opt_in_selector_names_a_node_label(capsys):
    objects = rendered(capsys, ROOT / "jobs" / "pets-s3.yaml")
    (job,) = by_kind(objects, "RayJob")
    worker = worker_group(job)["template"]["spec"]
    assert "nodeSelector" not in worker and worker["tolerations"] == [k8s.GPU_TOLERATION]
    assert "nvidia.com/gpu.present" not in k8s.to_yaml(objects)
    gke = rendered(
        capsys, ROOT / "jobs" / "pets-s3.yaml", "--node-selector", "cloud.google.com/gke-accelerator=nvidia-l4"
    )
    (job,) = by_kind(gke, "RayJob")
    assert worker_group(job)["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head and "tolerations" not in head  # the head needs no GPU node


def test_readme_admission_policy_is_valid_and_pins_image_and_account():
    """The optional ValidatingAdmissionPolicy the README shows, checked against the core schemas."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# ValidatingAdmissionPolicy.*?)```", text, flags=re.S)
    assert block, "README shows the ValidatingAdmissionPolicy"
    objects = [o for o in yaml.safe_load_all(block[1]) if o]
    assert [o["kind"] for o in objects] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    for obj in objects:
        check_core(obj)
    policy, binding = objects
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["rayjobs"]
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "serviceAccountName" in expressions and "image" in expressions
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    # it holds whatever the launcher's ServiceAccount creates, label or not
    (condition,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:tlray:pets-launcher" in condition["expression"]
    assert "launcher" in k8s.launcher_rbac("pets")[0]["metadata"]["name"]
