"""The champion gate's atomic latest.json without Ray, on a local folder and on loopback S3 (moto's server),
with concurrent publishers."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tlray.artifacts import champion
from tlray.artifacts.manifest import manifest_digest, read_run_manifest
from tlray.io import storage
from tlray.io.s3 import WriteConflict

from run_fixtures import fake_run
from s3_fixtures import FlakyProxy


# ---------------------------------------------------------------------------------------
# Compare-and-swap
# ---------------------------------------------------------------------------------------
def test_moto_implements_the_conditional_puts_the_gate_relies_on(s3_env, s3_bucket):
    """If-None-Match: * refuses an existing key, If-Match refuses a stale ETag (both 412)."""
    uri = f"s3://{s3_bucket}/job/latest.json"
    first = storage.write_if(uri, b"1", None, s3_env)
    with pytest.raises(WriteConflict):
        storage.write_if(uri, b"2", None, s3_env)
    second = storage.write_if(uri, b"3", first, s3_env)
    with pytest.raises(WriteConflict):
        storage.write_if(uri, b"4", first, s3_env)
    assert storage.read_versioned(uri, s3_env) == (b"3", second)


def test_local_compare_and_swap(tmp_path):
    uri = str(tmp_path / "job" / "latest.json")
    assert storage.read_versioned(uri) is None
    first = storage.write_if(uri, b"1", None)
    with pytest.raises(WriteConflict):
        storage.write_if(uri, b"2", None)
    storage.write_if(uri, b"3", first)
    with pytest.raises(WriteConflict):
        storage.write_if(uri, b"4", first)
    assert storage.read_versioned(uri)[0] == b"3"


# ---------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------
def candidate(run: str, endpoint: str | None = None) -> champion.Candidate:
    return champion.Candidate(run, run.rsplit("/", 1)[-1], "f" * 64, manifest_digest(run, endpoint))


def gate(job, run, scores, endpoint=None, policy="gate", min_improvement=0.0):
    return champion.gate(
        job, candidate(run, endpoint), policy, "val_accuracy", "max", min_improvement, scores.__getitem__, endpoint
    )


@pytest.fixture(params=["local", "s3"])
def job(request, tmp_path):
    """(job URI, endpoint) on a local folder and on loopback S3."""
    if request.param == "local":
        return str(tmp_path / "job"), None
    endpoint = request.getfixturevalue("s3_env")
    return f"s3://{request.getfixturevalue('s3_bucket')}/job", endpoint


def test_gate_promotes_a_better_run_and_keeps_the_champion_over_a_worse_one(job, caplog):
    job, endpoint = job
    a, b, c = (fake_run(f"{job}/runs/{n}", endpoint) for n in "abc")
    scores = {a: 0.70, b: 0.65, c: 0.80}
    caplog.set_level(logging.INFO, logger="tlray")

    assert gate(job, a, scores, endpoint).action == "promoted"
    kept = gate(job, b, scores, endpoint)
    assert (kept.action, kept.champion, kept.champion_value, kept.value) == ("kept", a, 0.70, 0.65)
    assert champion.read_pointer(job, endpoint)[0].run == a
    promoted = gate(job, c, scores, endpoint)
    assert (promoted.action, promoted.champion, promoted.reason) == ("promoted", a, "better")

    pointer = champion.read_pointer(job, endpoint)[0]
    assert (pointer.run, pointer.value, pointer.dataset_fingerprint) == (c, 0.80, "f" * 64)
    assert pointer.manifest_sha256 == manifest_digest(c, endpoint)
    history = champion.read_history(job, endpoint)
    assert [(h["action"], h["run"], h["value"], h["champion_value"]) for h in history] == [
        ("promoted", a, 0.70, None),
        ("kept", b, 0.65, 0.70),
        ("promoted", c, 0.80, 0.70),
    ]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("champion gate")]
    assert lines[1] == "champion gate (gate): kept b, val_accuracy 0.6500 vs champion a 0.7000: not better"


def test_min_improvement_and_the_other_policies(tmp_path):
    job = str(tmp_path / "job")
    a, b, c = (fake_run(f"{job}/runs/{n}") for n in "abc")
    scores = {a: 0.70, b: 0.72, c: 0.10}
    gate(job, a, scores)
    assert gate(job, b, scores, min_improvement=0.05).reason == "not better by at least 0.05"
    assert gate(job, b, scores, policy="never").action == "kept"
    assert champion.read_pointer(job)[0].run == a
    assert gate(job, c, scores, policy="always").action == "promoted"  # worse, but always
    assert champion.read_pointer(job)[0].run == c
    assert gate(job, c, scores).reason == "already the champion"


def test_a_champion_whose_files_are_gone_is_replaced(tmp_path):
    job = str(tmp_path / "job")
    a, b = (fake_run(f"{job}/runs/{n}") for n in "ab")
    gate(job, a, {a: 0.9})

    def score(uri):
        if uri == a:
            read_run_manifest(uri + "-gone")  # as published.load_published fails for a deleted run
        return 0.5

    decision = champion.gate(job, candidate(b), "gate", "val_accuracy", "max", 0.0, score)
    assert decision.action == "promoted" and "cannot be loaded" in decision.reason
    assert champion.read_pointer(job)[0].run == b


def test_a_run_killed_before_its_manifest_is_never_pointed_to(job):
    job, endpoint = job
    killed = fake_run(f"{job}/runs/killed", endpoint, sealed=False)
    with pytest.raises(FileNotFoundError):
        candidate(killed, endpoint)  # there is no artifact to name: the gate is never reached
    assert champion.read_pointer(job, endpoint) == (None, None)


# ---------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------
@pytest.fixture
def atomic_moto(monkeypatch):
    """moto checks If-Match / If-None-Match and then writes, in two steps without a lock; S3 does both
    atomically. A lock around moto's PutObject handler gives the loopback server S3's guarantee."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    original = S3Response.put_object

    def put_object(self):
        with lock:
            return original(self)

    monkeypatch.setattr(S3Response, "put_object", put_object)


def test_a_publisher_that_loses_the_race_decides_again_against_the_winner(s3_env, s3_bucket):
    """A reads the champion (none), and while A evaluates, B is promoted: A's create-if-absent fails with 412,
    A re-reads, compares itself with B on its own split, and keeps B because B is better."""
    job = f"s3://{s3_bucket}/job"
    a, b = (fake_run(f"{job}/runs/{n}", s3_env) for n in "ab")
    calls = []

    def score_for_a(uri):
        calls.append(uri)
        if len(calls) == 1:  # A's own score: meanwhile B publishes
            assert gate(job, b, {b: 0.9}, s3_env).action == "promoted"
        return {a: 0.8, b: 0.9}[uri]

    decision = champion.gate(job, candidate(a, s3_env), "gate", "val_accuracy", "max", 0.0, score_for_a, s3_env)
    assert (decision.action, decision.champion) == ("kept", b)
    assert calls == [a, b]
    assert champion.read_pointer(job, s3_env)[0].run == b
    assert [h["action"] for h in champion.read_history(job, s3_env)] == ["promoted", "kept"]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_concurrent_publishers_leave_latest_on_the_best_complete_run(where, tmp_path, request):
    """8 runs (and one killed before its manifest) publish at once over a weak champion. None of them writes
    until all have read the pointer and are evaluating that champion (a barrier in the evaluation), so every
    write races: exactly one may replace the weak champion, the others must lose, re-read and decide again.
    No update may be lost: latest.json must end on the best run, with one history line per publisher."""
    if where == "s3":
        request.getfixturevalue("atomic_moto")
        endpoint = request.getfixturevalue("s3_env")
        job = f"s3://{request.getfixturevalue('s3_bucket')}/job"
    else:
        endpoint, job = None, str(tmp_path / "job")
    weak = fake_run(f"{job}/runs/weak", endpoint)
    gate(job, weak, {weak: 0.1}, endpoint)
    runs = [fake_run(f"{job}/runs/r{i}", endpoint, content=f"w{i}".encode()) for i in range(8)]
    scores = {weak: 0.1, **dict(zip(runs, [0.61, 0.93, 0.72, 0.55, 0.88, 0.90, 0.47, 0.80], strict=True))}
    fake_run(f"{job}/runs/killed", endpoint, sealed=False)
    all_have_read = threading.Barrier(len(runs))

    def score(uri):
        if uri == weak:
            all_have_read.wait(timeout=60)
        return scores[uri]

    def publish_one(run):
        return champion.gate(job, candidate(run, endpoint), "gate", "val_accuracy", "max", 0.0, score, endpoint)

    with ThreadPoolExecutor(len(runs)) as pool:
        decisions = list(pool.map(publish_one, runs))

    assert len([d for d in decisions if d.champion == weak]) == 1  # the others lost the race and re-decided
    best = max(runs, key=scores.get)
    pointer = champion.read_pointer(job, endpoint)[0]
    assert pointer.run == best
    assert pointer.manifest_sha256 == manifest_digest(best, endpoint)
    history = champion.read_history(job, endpoint)
    assert sorted(h["run"] for h in history[1:]) == sorted(runs)  # one line per publisher, none lost
    assert [d.action for d in decisions if d.run == best] == ["promoted"]
    for d in decisions:  # every "kept" was against a better champion; every promotion beat its predecessor
        if d.action == "kept":
            assert d.champion_value > d.value
        else:
            assert d.value > d.champion_value


class NoConditionalWrites(FlakyProxy):
    """A store that answers 501 NotImplemented to PutObject with If-Match / If-None-Match, like S3
    look-alikes without conditional writes; everything else goes through to moto."""

    def __init__(self, upstream: str):
        super().__init__(upstream, fail_ratio=0.0)
        self.refused = 0

    def _handler_class(self):
        proxy, base = self, super()._handler_class()

        class Handler(base):
            def _handle(self):
                if self.command == "PUT" and ("If-Match" in self.headers or "If-None-Match" in self.headers):
                    self._read_body()
                    proxy.refused += 1
                    body = b"<Error><Code>NotImplemented</Code><Message>conditional writes</Message></Error>"
                    self.send_response(501)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super()._handle()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler


def test_stores_without_conditional_writes_fall_back_to_plain_writes_and_say_so(s3_env, s3_bucket, caplog):
    caplog.set_level(logging.INFO, logger="tlray")
    with NoConditionalWrites(s3_env) as store:
        endpoint = store.endpoint
        job = f"s3://{s3_bucket}/job"
        a, b = (fake_run(f"{job}/runs/{n}", endpoint) for n in "ab")
        assert gate(job, a, {a: 0.5, b: 0.6}, endpoint).action == "promoted"
        assert gate(job, b, {a: 0.5, b: 0.6}, endpoint).action == "promoted"
        assert champion.read_pointer(job, endpoint)[0].run == b
        assert len(champion.read_history(job, endpoint)) == 2
        assert store.refused >= 4  # it really refused: each pointer and history write was tried conditionally first
    assert any("does not support conditional writes" in r.getMessage() for r in caplog.records)


def test_if_data_changed_message_only_for_the_champions_fingerprint(tmp_path):
    job = str(tmp_path / "job")
    assert champion.unchanged_data_message(job, "f" * 64) is None  # no champion yet: train
    a = fake_run(f"{job}/runs/a")
    gate(job, a, {a: 0.5})
    assert champion.unchanged_data_message(job, "e" * 64) is None
    assert "dataset unchanged since the champion a" in champion.unchanged_data_message(job, "f" * 64)
