"""`tlray render SPEC --image IMAGE`: print the Kubernetes manifests of a job (KubeRay RayJob by default),
sized from its scaling section. Light (no torch, no pyarrow): it runs wherever kubectl does."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import yaml

from tlray.k8s import manifests as k8s
from tlray.spec import load_spec


def render(
    spec_file: str,
    image: str,
    overrides: Sequence[str] = (),
    kind: str = "rayjob",
    namespace: str | None = None,
    schedule: str = k8s.DEFAULT_SCHEDULE,
    api_server_port: Sequence[int] = (),
    dns_port: Sequence[int] = (),
    irsa_role_arn: str | None = None,
    priority_class: str | None = None,
    queue: str | None = None,
    egress_port: Sequence[int] = (),
    node_selector: Sequence[str] = (),
) -> None:
    spec = load_spec(spec_file, overrides)  # 1. the whole spec is checked before anything is printed
    for warning in k8s.cluster_warnings(spec):
        print(f"tlray: warning: {warning}", file=sys.stderr)
    # 2. the ConfigMap carries the spec as written plus any --set, with defaults left implicit
    spec_yaml = f"# rendered by tlray render from {spec_file}\n" + yaml.safe_dump(
        spec.model_dump(mode="json", exclude_unset=True), sort_keys=False
    )
    options = k8s.ClusterOptions(  # 3. what depends on the cluster
        api_server_ports=tuple(api_server_port),
        dns_ports=tuple(dns_port),
        irsa_role_arn=irsa_role_arn,
        priority_class=priority_class,
        queue=queue,
        egress_ports=tuple(egress_port),
        node_selector=tuple(k8s.node_selector_pair(pair) for pair in node_selector),
    )
    objects = k8s.render(spec, spec_yaml, image, kind, namespace, schedule, options)  # 4. the objects
    for warning in k8s.kind_warnings(kind):
        print(f"tlray: warning: {warning}", file=sys.stderr)
    for note in k8s.egress_notes(spec, options):
        print(f"tlray: {note}", file=sys.stderr)
    print(k8s.to_yaml(objects), end="")
