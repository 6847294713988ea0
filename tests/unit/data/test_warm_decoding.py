"""A one-worker run warms the decoding processes it leaves room for (tlray.data.pipeline), never more than a few."""

from __future__ import annotations

import ray

from tlray.data import pipeline


def test_warming_asks_one_cpu_task_per_free_cpu_up_to_the_cap(monkeypatch):
    submitted: list[dict] = []

    def remote(**options):
        def wrap(function):
            class Task:
                @staticmethod
                def remote():
                    submitted.append({**options, "function": function})

            return Task

        return wrap

    monkeypatch.setattr(ray, "remote", remote)
    for free_cpus, warmed in ((-1, 0), (0, 0), (1, 1), (3, 3), (64, pipeline.MAX_WARM_PROCESSES)):
        submitted.clear()
        pipeline.warm_decoding_processes(free_cpus)
        assert len(submitted) == warmed, free_cpus
        one_cpu_each = {"num_cpus": 1, "max_retries": 0, "function": pipeline.import_decoding}
        assert all(task == one_cpu_each for task in submitted)
    assert pipeline.MAX_WARM_PROCESSES == 4
