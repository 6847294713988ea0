"""`tlray launch TEMPLATE`: create a RayJob from a suspended template RayCronJob (what the scheduled
CronJob runs in its pod). Light: the launcher pod has 0.5 GiB, so no torch, Ray or pyarrow."""

from __future__ import annotations

from tlray.k8s import launch as k8s_launch


def launch(
    template: str,
    namespace: str | None = None,
    keep: int = 5,
    api_server: str | None = None,
    if_data_changed: bool = False,
    spec_file: str | None = None,
) -> None:
    # 1. the API server: the given URL, or in-cluster with the pod's ServiceAccount
    api = k8s_launch.KubernetesApi(api_server) if api_server else k8s_launch.KubernetesApi.in_cluster()
    data_check = k8s_launch.data_check(spec_file) if if_data_changed else None  # 2. --if-data-changed
    k8s_launch.launch(api, namespace or k8s_launch.current_namespace(), template, keep, data_check)  # 3. the run
