"""How long a job name may be: the Kubernetes names derived from it, and the limits KubeRay puts on them.

A job's name becomes the name of its RayJob, RayCluster or RayCronJob, and, with a suffix, of the
objects made from those later (by KubeRay, the CronJob controller or `tlray launch`). A name that
passes `tlray validate` but makes one of those too long would schedule nothing, with the error only
in the operator's log. So the spec allows a name only if every name derived from it fits. No
dependencies: `tlray validate` and `tlray render` share these rules without importing anything heavy.
"""

from __future__ import annotations

import re

# RayJob, RayCluster and RayCronJob names must be DNS-1035 labels (KubeRay validates them with
# IsDNS1035Label): lowercase letters, digits and '-', starting with a letter, ending with a letter or digit.
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# KubeRay v1.7 (ray-operator/controllers/ray/utils/constant.go and validation.go):
RAYCLUSTER_MAX = 53  # its Services are "<cluster>-serve-svc" and must fit in 63
RAYJOB_MAX = RAYCLUSTER_MAX - 6  # 47: a RayJob's cluster is "<rayjob>-<5 random characters>"
RAYCRONJOB_MAX = 36  # MaxRayCronJobNameLength: room for the "-<tick>" of each RayJob it creates
# Kubernetes: a CronJob's Jobs are "<cronjob>-<minutes since the epoch>", which must fit in 63.
CRONJOB_MAX = 52
# `tlray launch` names each scheduled run by generateName "<name>-": the API server appends 5 characters.
GENERATED_RUN_SUFFIX = len("-") + 5
SCHEDULE_SUFFIX = "-schedule"  # the fallback CronJob, "<name>-schedule"

# Every name derived from a job name that has a limit: (what it is, characters added to the name, its limit).
DERIVED_NAMES: tuple[tuple[str, int, int], ...] = (
    ("RayJob <name> (tlray render, k8s/base)", 0, RAYJOB_MAX),
    ("RayCluster <name> (--kind raycluster)", 0, RAYCLUSTER_MAX),
    ("RayJob <name>-<5 random> (each run of the CronJob fallback)", GENERATED_RUN_SUFFIX, RAYJOB_MAX),
    (f"CronJob <name>{SCHEDULE_SUFFIX} (the CronJob fallback)", len(SCHEDULE_SUFFIX), CRONJOB_MAX),
)
# The tightest of them sets the limit: 41 characters, for the RayJobs of the CronJob fallback (47 - 6).
TIGHTEST_DERIVED_NAME = min(DERIVED_NAMES, key=lambda derived: derived[2] - derived[1])
MAX_NAME_LENGTH = TIGHTEST_DERIVED_NAME[2] - TIGHTEST_DERIVED_NAME[1]


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a job name, or None."""
    if not DNS_1035_LABEL.match(name):
        return (
            f"'{name}' is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter "
            "and ending with a letter or digit), which KubeRay requires of RayJob names"
        )
    if len(name) > MAX_NAME_LENGTH:
        derived, _, limit = TIGHTEST_DERIVED_NAME
        return (
            f"'{name}' has {len(name)} characters; at most {MAX_NAME_LENGTH}, so that the {derived} "
            f"stays within its limit of {limit}"
        )
    return None


def raycronjob_name_problem(name: str) -> str | None:
    """Why `name` cannot name a RayCronJob (stricter than a job name), or None."""
    if len(name) > RAYCRONJOB_MAX:
        return (
            f"the RayCronJob name '{name}' has {len(name)} characters; KubeRay v1.7 refuses RayCronJob names over "
            f"{RAYCRONJOB_MAX} (MaxRayCronJobNameLength) and schedules nothing. Shorten the spec's name to "
            f"{RAYCRONJOB_MAX} characters or use --kind cronjob (up to {MAX_NAME_LENGTH})"
        )
    return None
