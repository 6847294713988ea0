"""The Kubernetes side, checked offline for real: every kustomize overlay (with each optional
component) and `tlray render` output is rendered, validated against the KubeRay v1.7.0 CRD
schemas (unknown fields are errors) and the core Kubernetes schemas (`kubernetes-validate
--strict`), and every pod template in it is walked for the restricted security fields."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tlray import k8s
from tlray.cli import main
from tlray.spec import load_spec

from conftest import ROOT

KUBERAY_CRDS = Path(os.environ.get("TLRAY_KUBERAY_CRDS", ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()  # the newest the package knows
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
OVERLAYS = ("cpu-dev", "gpu-prod")
MODES = (None, "raycluster", "raycronjob", "cronjob")  # None: the overlay as shipped (one RayJob)
SECRET_NAME_HINTS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL")

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl renders the kustomize overlays: apt-get install -y kubectl"
)


# ---------------------------------------------------------------------------------------
# What is checked
# ---------------------------------------------------------------------------------------
def kustomize(overlay: str, mode: str | None, workdir: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay, with the mode's component uncommented as its README says."""
    root = ROOT
    if mode:
        for folder in ("k8s", "jobs"):
            shutil.copytree(ROOT / folder, workdir / folder)
        kustomization = workdir / "k8s" / "overlays" / overlay / "kustomization.yaml"
        text = kustomization.read_text()
        assert f"# - ../../components/{mode} " in text, "the overlay lists the component to uncomment"
        text = text.replace("# components:", "components:").replace(f"# - ../../components/{mode} ", f"- ../../components/{mode} ")
        kustomization.write_text(text)
        root = workdir
    done = subprocess.run(["kubectl", "kustomize", str(root / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def rendered(capsys, spec: Path, *args: str) -> list[dict]:
    assert main(["render", str(spec), "--image", "registry.example.com/tlray:1.0", *args]) == 0
    return [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]


@cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((KUBERAY_CRDS / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def closed(schema: dict) -> dict:
    """The API server prunes fields its schema does not declare; here they are errors instead."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
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
        assert shm and any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"]), f"{where}: /dev/shm"


def check_all(objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] in CRD_FILES:
            check_against_crd(obj)
        else:
            check_core(obj)
        for where, pod in pod_templates(obj.get("spec", {})):
            check_pod(f"{obj['kind']} {obj['metadata']['name']}{where}", pod)
            # the nested templates against the core PodTemplate schema too
            check_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod}})
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
    assert all(o["metadata"].get("namespace") == namespace["metadata"]["name"] for o in objects if o["kind"] != "Namespace")
    assert by_kind(objects, "NetworkPolicy") and by_kind(objects, "ServiceAccount")

    rayjobs = by_kind(objects, "RayJob")
    if mode is None:
        (job,) = rayjobs
        spec = job["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        assert spec["entrypoint"].startswith("tlray tune job.yaml")
        config_map = by_kind(objects, "ConfigMap")[0]
        volumes = spec["submitterPodTemplate"]["spec"]["volumes"]
        assert {"name": "job-spec", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
        assert config_map["data"]["job.yaml"] == (ROOT / "jobs" / "pets-s3.yaml").read_text()
    elif mode == "cronjob":
        (template,) = rayjobs
        assert template["spec"]["suspend"] is True and template["metadata"]["name"] == "pets-template"
        (cron,) = by_kind(objects, "CronJob")
        assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["startingDeadlineSeconds"] > 0
        assert cron["spec"]["successfulJobsHistoryLimit"] and cron["spec"]["failedJobsHistoryLimit"]
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["command"] == ["tlray", "launch", "pets-template"]
        (role,) = by_kind(objects, "Role")
        assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "delete"]}]
        (binding,) = by_kind(objects, "RoleBinding")
        assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                          "namespace": cron["metadata"]["namespace"]}
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
            assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert group["template"]["spec"]["nodeSelector"]
        else:
            assert "nvidia.com/gpu" not in limits and group["maxReplicas"] == 1
            if obj["kind"] != "RayCluster":
                entrypoint = (obj["spec"].get("jobTemplate") or obj["spec"])["entrypoint"]
                assert "--set scaling.use_gpu=false" in entrypoint


def test_network_policy_keeps_the_job_api_inside(tmp_path):
    policy = k8s.network_policy("pets")
    own = {"podSelector": {"matchLabels": k8s.labels("pets")}}
    assert policy["spec"]["podSelector"] == own["podSelector"] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in policy["spec"]["ingress"]:
        sources = rule["from"]
        if sources == [own]:
            continue  # Ray's ports among the job's own pods
        # the only other way in: the KubeRay operator's pods, to the job API
        assert sources[0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
        assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])]
    assert 53 in egress_ports and 443 in egress_ports


def test_generated_manifests_are_in_sync_with_tlray_k8s():
    """k8s/base and k8s/components come from tlray/k8s.py: run `make manifests` after changing it."""
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
    path.write_text((ROOT / "jobs" / "digits.yaml").read_text().replace("uri: data/digits", "uri: s3://bucket/digits")
                    .replace("uri: outputs", "uri: s3://bucket/runs"))
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
        capsys, ROOT / "jobs" / "pets-s3.yaml",
        "--set", "scaling.num_workers=4", "--set", "scaling.gpus_per_worker=2", "--set", "tune.max_concurrent_trials=3",
    )
    check_all(objects)
    (job,) = by_kind(objects, "RayJob")
    group = worker_group(job)
    assert group["replicas"] == group["maxReplicas"] == 12  # 3 trials x 4 workers
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
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
    assert main(["render", str(ROOT / "jobs" / "digits-tune.yaml"), "--image", "tlray:1"]) == 0
    assert "model.weights: 'data/digits-resnet18.pt' is a local path" in capsys.readouterr().err
    assert main(["render", str(ROOT / "jobs" / "pets-s3.yaml"), "--image", "tlray:1"]) == 0
    assert capsys.readouterr().err == ""  # s3:// data and output, torchvision weights by name
    assert main(["render", str(ROOT / "jobs" / "digits.yaml"), "--image", "tlray:1", "--set", "train.epochs=0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "train.epochs" in err


# ---------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------
def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${RAY_IMAGE}" in text and "rayproject/ray:2.60.0-py311-" in text
    assert "\nUSER 1000:100\n" in text, "runs as the image's non-root ray user"
