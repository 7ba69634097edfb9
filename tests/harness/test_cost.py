"""The isolated cost phase's pieces without Ray: one task per variant (the seeds share it), the profiling protocol
of `ddsm-bench profile`, peak memory that tells models of different size apart on CPU, the cache."""
from __future__ import annotations

import dataclasses

import pytest

from harness import cost
from harness.cells import expand
from harness.spec import load_spec, parse_spec


def test_one_task_per_variant_keyed_by_what_is_measured(repo_root):
    spec = load_spec(repo_root / "ablations" / "quickstart.yaml")
    cells = expand(spec)
    tasks = cost.plan(cells, spec.cost)
    assert len(cells) == 10 and [t.variant for t in tasks] == list(dict.fromkeys(c.variant for c in cells))
    assert len({t.key for t in tasks}) == 5 and all(t.threads == 1 and t.device == "cpu" for t in tasks)
    assert (tasks[0].repeats, tasks[0].warmup, tasks[0].size) == (10, 3, (64, 64))  # the quickstart's cost section
    again = cost.plan(cells, dataclasses.replace(spec.cost, repeats=20))
    assert tasks[0].key != again[0].key  # another protocol is another measurement


def test_cost_section_is_validated():
    with pytest.raises(Exception, match="cost.repeats=0 is not allowed"):
        parse_spec({"name": "t", "baselines": [{"name": "fpn"}], "cost": {"repeats": 0}})
    with pytest.raises(Exception, match="unknown key 'cost.warm'"):
        parse_spec({"name": "t", "baselines": [{"name": "fpn"}], "cost": {"warm": 1}})


def test_measure_follows_the_profile_protocol_and_memory_tells_sizes_apart(tmp_path):
    raw = {"name": "t", "base": {"model": {"backbone": "resnet18", "decoder_dim": 16},
                                 "data": {"image_size": [32, 32], "crop_size": [32, 32]}},
           "baselines": [{"name": "small", "overrides": {"model.name": "fpn"}},
                         {"name": "large", "overrides": {"model.name": "fpn", "model.backbone": "resnet34"}}],
           "cost": {"repeats": 2, "warmup": 1}}
    spec = parse_spec(raw)
    tasks = cost.plan(expand(spec), spec.cost)
    calls = []

    def run(task):
        calls.append(task.variant)
        return cost.measure(task)

    records = cost.run_cost_phase(tasks, out=tmp_path, run=run)
    small, large = records["small"], records["large"]
    assert small["latency_ms"]["repeats"] == 2 and small["latency_ms"]["warmup"] == 1
    assert small["latency_ms"]["p25"] <= small["latency_ms"]["median"] <= small["latency_ms"]["p75"]
    assert small["peak_mem_kind"] == "cpu_profiler_allocated" and small["device_type"] == "cpu"
    assert large["peak_mem_mb"] > small["peak_mem_mb"] + 10  # resnet34 holds ~40 MB more weights
    assert large["train_peak_mem_mb"] > small["train_peak_mem_mb"]
    metrics = cost.cost_metrics(small)
    assert set(metrics) == {"latency_ms", "latency_ms_p25", "latency_ms_p75", "train_step_ms", "train_step_ms_p25",
                            "train_step_ms_p75", "peak_mem_mb", "train_peak_mem_mb"}
    assert cost.run_cost_phase(tasks, out=tmp_path, run=run) == records and calls == ["small", "large"]  # cached
    assert "2 timed calls" in cost.describe(spec.cost, records)
