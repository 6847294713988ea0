"""The champion gate: which published run `<output.uri>/<name>/latest.json` points at, and why.

A finished, sealed run (publish.MANIFEST) is offered to the gate. Under `publish.policy: gate` it
replaces the champion only if it beats it by `publish.min_improvement` on the *new* run's validation
split, with the champion evaluated there too (datasets grow, so the champion's own old score says
little). Every decision is one log line and one line of `<output.uri>/<name>/history.jsonl`.

Concurrency: the pointer is replaced by compare-and-swap. Read it with its version (S3 ETag), decide,
and write it only if it is still that version (`If-Match`; `If-None-Match: *` for the first champion).
A publisher that loses the race re-reads the new champion and decides again against it, so two runs
publishing at once leave the pointer on the better of them, and no update is lost. On a local folder
an exclusive file lock around check-and-replace gives the same (storage.write_if).

Stores without conditional writes (they answer 501 NotImplemented) fall back to a plain write after
the same read-decide cycle: last writer wins, so two publishers finishing within one evaluation of each
other can lose an update. The fallback says so in the log; run one publisher per job there (the
scheduled CronJob's `concurrencyPolicy: Forbid` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tlray.errors import UserError
from tlray.io import storage
from tlray.io.s3 import ConditionalWritesUnsupported, WriteConflict
from tlray.metrics import metric_mode

log = logging.getLogger("tlray")

LATEST = "latest.json"
HISTORY = "history.jsonl"
MAX_ROUNDS = 20  # re-decisions after lost races before giving up (each one means another run was promoted)


@dataclass(frozen=True)
class Pointer:
    """The content of latest.json."""

    run: str  # URI of the champion's run folder
    run_id: str
    metric: str
    value: float  # the champion's metric on its own validation split, when it was promoted
    dataset_fingerprint: str
    manifest_sha256: str  # which exact artifact: a rewritten run no longer matches
    promoted_at: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Pointer:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise UserError(f"{where} is not a tlray champion pointer ({exc}); delete it to start over") from None


@dataclass(frozen=True)
class Candidate:
    run: str
    run_id: str
    dataset_fingerprint: str
    manifest_sha256: str


@dataclass(frozen=True)
class Decision:
    action: str  # "promoted" | "kept"
    reason: str
    run: str  # the candidate
    value: float | None  # the candidate's metric on its validation split
    champion: str | None  # the champion it was compared with (the previous one when promoted)
    champion_value: float | None  # the champion's metric on the candidate's validation split
    metric: str
    policy: str
    at: str

    def line(self) -> str:
        def show(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        versus = f" vs champion {self.champion.rsplit('/', 1)[-1]} {show(self.champion_value)}" if self.champion else ""
        return (
            f"champion gate ({self.policy}): {self.action} {self.run.rsplit('/', 1)[-1]}, {self.metric} "
            f"{show(self.value)}{versus}: {self.reason}"
        )


def latest_uri(job: str) -> str:
    return storage.join(job, LATEST)


def history_uri(job: str) -> str:
    return storage.join(job, HISTORY)


def read_pointer(job: str, endpoint_url: str | None = None) -> tuple[Pointer | None, str | None]:
    """(champion pointer, its version for write_if) or (None, None) before the first promotion."""
    found = storage.read_versioned(latest_uri(job), endpoint_url)
    if found is None:
        return None, None
    data, version = found
    return Pointer.from_json(data, latest_uri(job)), version


def better(value: float, champion_value: float, mode: str, min_improvement: float) -> bool:
    """Strictly better than the champion, and by at least `min_improvement` (in the metric's units)."""
    gain = value - champion_value if mode == "max" else champion_value - value
    return gain > 0 and gain >= min_improvement


def judge(
    pointer: Pointer | None,
    candidate: Candidate,
    value: float | None,
    policy: str,
    mode: str,
    min_improvement: float,
    score: Callable[[str], float],
) -> tuple[str, str, float | None]:
    """(action, reason, champion's value on the candidate's split) against the champion `pointer` names."""
    if policy == "never":
        return "kept", "publish.policy is never", None
    if pointer is None:
        return "promoted", "first champion", None
    if pointer.run == candidate.run and pointer.manifest_sha256 == candidate.manifest_sha256:
        return "kept", "already the champion", value
    if policy == "always":
        return "promoted", "publish.policy is always", None
    try:
        champion_value = score(pointer.run)
    except UserError as exc:  # its artifact was deleted or damaged: nothing left to defend the title
        return "promoted", f"the champion cannot be loaded: {str(exc).splitlines()[0]}", None
    if better(value, champion_value, mode, min_improvement):
        return "promoted", "better", champion_value
    reason = f"not better by at least {min_improvement:g}" if min_improvement else "not better"
    return "kept", reason, champion_value


def gate(
    job: str,
    candidate: Candidate,
    policy: str,
    metric: str,
    mode: str,
    min_improvement: float,
    score: Callable[[str], float],
    endpoint_url: str | None = None,
    now: Callable[[], str] | None = None,
) -> Decision:
    """Decide whether `candidate` becomes the champion, move latest.json if so, and record the decision.

    `score(run_uri)`: a run's `metric` on the candidate's validation split. It is called for the candidate
    once and for each champion it is compared with (again after a lost race, against the new champion).
    """
    from tlray.artifacts.publish import now as utc_now

    now = now or utc_now
    value = score(candidate.run) if policy != "never" else None
    decision = None
    fallback = False
    for _ in range(MAX_ROUNDS):
        pointer, version = read_pointer(job, endpoint_url)
        action, reason, champion_value = judge(pointer, candidate, value, policy, mode, min_improvement, score)
        champion = pointer.run if pointer else None
        decision = Decision(action, reason, candidate.run, value, champion, champion_value, metric, policy, now())
        if action == "kept":
            break
        new = Pointer(
            candidate.run,
            candidate.run_id,
            metric,
            value,
            candidate.dataset_fingerprint,
            candidate.manifest_sha256,
            decision.at,
        )
        try:
            if fallback:
                write_unconditionally(latest_uri(job), new.to_json(), endpoint_url)
            else:
                storage.write_if(latest_uri(job), new.to_json(), version, endpoint_url)
            break
        except WriteConflict:
            log.info("champion gate: %s changed while deciding; deciding again against the new champion", LATEST)
            decision = None
        except ConditionalWritesUnsupported:
            log.warning(
                "champion gate: the store does not support conditional writes; writing %s unconditionally "
                "(last writer wins: run one publisher per job at a time)",
                LATEST,
            )
            fallback, decision = True, None
    if decision is None:
        raise RuntimeError(f"champion gate: {latest_uri(job)} kept changing; gave up after {MAX_ROUNDS} rounds")
    log.info(decision.line())
    append_history(job, decision, endpoint_url)
    return decision


def append_history(job: str, decision: Decision, endpoint_url: str | None = None) -> None:
    """One JSON line per decision. S3 has no append: read, add the line, write if unchanged, else retry."""
    line = json.dumps(asdict(decision), sort_keys=True).encode() + b"\n"
    uri = history_uri(job)
    for _ in range(MAX_ROUNDS * 5):
        found = storage.read_versioned(uri, endpoint_url)
        data, version = found if found else (b"", None)
        try:
            storage.write_if(uri, data + line, version, endpoint_url)
            return
        except WriteConflict:
            continue
        except ConditionalWritesUnsupported:
            write_unconditionally(uri, data + line, endpoint_url)
            return
    raise RuntimeError(f"champion gate: could not append to {uri}: it kept changing")


def write_unconditionally(uri: str, data: bytes, endpoint_url: str | None) -> None:
    from tlray.io import s3

    s3.write_unconditionally(uri, data, endpoint_url, key="output.uri", max_attempts=storage.s3_max_attempts())


def read_history(job: str, endpoint_url: str | None = None) -> list[dict]:
    found = storage.read_versioned(history_uri(job), endpoint_url)
    return [json.loads(line) for line in found[0].splitlines() if line.strip()] if found else []


def unchanged_data_message(job: str, fingerprint: str, endpoint_url: str | None = None) -> str | None:
    """For `--if-data-changed`: the line to print when the champion was trained on exactly this data."""
    pointer, _ = read_pointer(job, endpoint_url)
    if pointer is None or pointer.dataset_fingerprint != fingerprint:
        return None
    return (
        f"[tlray] dataset unchanged since the champion {pointer.run_id} (fingerprint {fingerprint[:12]}); "
        "nothing to do (--if-data-changed)"
    )


def decide(spec, run: str, source) -> Decision:
    """The gate for a run `tlray train`/`tune` just sealed, scored on its own validation split (`source`)."""
    from tlray.artifacts import publish
    from tlray.flows import evaluate

    endpoint = spec.dataset.endpoint_url
    metadata = storage.read_json(storage.join(run, "metadata.json"), endpoint)
    candidate = Candidate(
        run, metadata["run_id"], metadata["dataset"]["fingerprint"], publish.manifest_digest(run, endpoint)
    )
    scores: dict[str, float] = {}
    metric = spec.publish.metric

    def score(uri: str) -> float:
        # the training loop measured the candidate's accuracy on this very split (its loss has label smoothing)
        measured = metadata["metrics"].get(metric) if metric != "val_loss" else None
        if uri == run and measured is not None:
            return measured
        if uri not in scores:
            scores[uri] = evaluate.gate_score(evaluate.load_published(uri, endpoint), source, metric)
        return scores[uri]

    return gate(
        spec.job_uri,
        candidate,
        spec.publish.policy,
        metric,
        metric_mode(metric),
        spec.publish.min_improvement,
        score,
        endpoint,
    )
