"""Random-interrupt stress test of ``ddsm-bench run`` (slow: ~10-20 minutes), after Ray Tune's restore stress test.

A grid of 6 short cells is run once without interruption (the reference), then again in a fresh out dir
whose driver is killed 10+ times at seeded random moments with SIGINT, SIGTERM or SIGKILL and re-run
until it exits 0. Checked at the end:

- no cell trains again once it finished (no attempt starts after its ``result.json`` appeared);
- no duplicate child run, nothing RUNNING (every run and the parent FINISHED);
- results bit-identical to the reference (accuracy metrics, per-class IoU, confusion matrix, the final
  weights), and one point per step in every metric history;
- all sessions together take at most 1.5x the reference plus the cost of each restart, measured: the
  session's start-up (a re-run of the finished reference, which only skips), the trials' start-up (in the
  reference, from the end of its session start-up to the first training step: worker process, imports,
  model and data), and the stop itself (from the signal to the driver's exit: the running cells
  checkpoint). What is left for the 0.5x is the work lost since the last checkpoints.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from harness.cells import expand
from harness.spec import load_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SEED = 14
ACCURACY = ("miou", "pixel_acc", "bf_1px", "bf_2px", "biou")


def _session(spec: Path, out: Path, ray_address: str, log: Path, *, kill_after: float | None = None,
             sig: int = signal.SIGINT) -> tuple[int, float]:
    """One driver session; with ``kill_after``, send ``sig`` that many seconds after it started."""
    tic = time.time()
    with log.open("a") as f:
        f.write(f"\n===== session (kill {signal.Signals(sig).name} after {kill_after}) =====\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(spec), "--out", str(out),
                                 "--address", ray_address, "--max-concurrent", "2"], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.wait(timeout=120)
    if proc.returncode == -signal.SIGKILL:
        time.sleep(2)  # Ray ends a dead driver's tasks: let it before the next session starts
    return proc.returncode, time.time() - tic


class Watch:
    """Polls the cell folders and notes when each result.json first appeared."""

    def __init__(self, out: Path, cells) -> None:
        self.out, self.cells, self.first_seen, self.stop = out, cells, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            for c in self.cells:
                if c.hash not in self.first_seen and (self.out / "cells" / c.hash / "result.json").is_file():
                    self.first_seen[c.hash] = time.time()


def _final(out: Path, cell) -> dict:
    d = out / "cells" / cell.hash
    metrics = json.loads((d / "result.json").read_text())["metrics"]
    weights = torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
    return {"metrics": {k: metrics[k] for k in ACCURACY}, "per_class": (d / "per_class_iou.csv").read_text(),
            "confusion": (d / "confusion.csv").read_text(), "weights": weights}


def test_random_interrupts_lose_nothing_and_change_nothing(ray_address: str, tmp_path: Path, write_spec, tiny_base):
    base = {**tiny_base, "train": {**tiny_base["train"], "steps": 12, "ckpt_every": 2}}
    spec = write_spec(tmp_path / "stress.yaml", base=base, seeds=list(range(6)))
    cells = expand(load_spec(spec))
    log = tmp_path / "sessions.log"

    ref = tmp_path / "ref"
    t0 = time.time()
    rc, t_ref = _session(spec, ref, ray_address, log)
    assert rc == 0, log.read_text()[-3000:]
    rc, t_start = _session(spec, ref, ray_address, log)  # a finished grid: only the fixed cost of a session
    assert rc == 0
    ref_client = MlflowClient(tracking_uri=f"sqlite:///{ref / 'mlflow.db'}")
    first_step = min(m.timestamp / 1000 for r in ref_client.search_runs(
        [ref_client.get_experiment_by_name("stress").experiment_id], "tags.kind = 'cell'")
        for m in ref_client.get_metric_history(r.info.run_id, "loss") if m.step == 1)
    t_trial = max(0.0, first_step - t0 - t_start)  # the trials' start-up, to their first step

    out, rng = tmp_path / "out", random.Random(SEED)
    watch = Watch(out, cells)
    sessions: list[tuple[str, float, int, float]] = []
    # Each interrupted session gets its start-up plus a random slice of ~1/12 of the reference's training
    # time (from the last half of start-up on, so some kills land there too): 12 interrupts then fit in
    # the grid's work instead of sessions finishing before their kill.
    work = t_ref - t_start
    while sum(1 for s in sessions if s[2] != 0) < 12 and len(sessions) < 20:
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        after = rng.uniform(0.5, 1.0) * t_start + rng.uniform(0.0, 2.0 * work / 12)
        rc, took = _session(spec, out, ray_address, log, kill_after=after, sig=sig)
        sessions.append((signal.Signals(sig).name, after, rc, took))
        assert rc in (0, 130, -signal.SIGKILL), log.read_text()[-3000:]
        if rc == 0:
            break  # the grid finished between two kills
    for _ in range(0 if rc == 0 else 10):  # then until done
        rc, took = _session(spec, out, ray_address, log)
        sessions.append(("none", 0.0, rc, took))
        if rc == 0:
            break
    watch.stop.set()
    assert rc == 0, log.read_text()[-3000:]
    killed = sum(1 for s in sessions if s[2] != 0)

    # no finished cell trains again; interrupted cells resumed from their checkpoints
    resumed = 0
    for c in cells:
        tries = [json.loads(x) for x in (out / "cells" / c.hash / "attempts.jsonl").read_text().splitlines()]
        launches = [a["time"] for a in tries]
        assert max(launches) < watch.first_seen[c.hash], (c.name, launches, watch.first_seen[c.hash])
        resumed += sum(a["resumed"] for a in tries)
    assert resumed >= 3, resumed
    # no duplicate run, nothing RUNNING
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stress")
    children = client.search_runs([exp.experiment_id], "tags.kind = 'cell'")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'grid'")
    assert sorted(r.data.tags["cell_hash"] for r in children) == sorted(c.hash for c in cells)
    assert {r.info.status for r in [*children, *parents]} == {"FINISHED"} and len(parents) == 1
    for r in children:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 13)), (r.data.tags["cell_hash"], sorted(steps))
    # bit-identical to the uninterrupted run
    for c in cells:
        a, b = _final(ref, c), _final(out, c)
        assert a["metrics"] == b["metrics"] and a["per_class"] == b["per_class"] and a["confusion"] == b["confusion"]
        assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items()), c.name
    # time: within 1.5x the reference plus one start-up per restart
    total = sum(s[3] for s in sessions)
    stops = sum(s[3] - s[1] for s in sessions if s[2] != 0)  # signal -> exit, over the interrupted sessions
    budget = 1.5 * t_ref + (len(sessions) - 1) * t_start + killed * t_trial + stops
    print(f"\nstress: reference {t_ref:.0f} s, session start-up {t_start:.0f} s, trials' start-up {t_trial:.0f} s; "
          f"{killed} interrupted sessions ({', '.join(f'{s[0]}@{s[1]:.0f}s->rc {s[2]}' for s in sessions if s[2] != 0)})"
          f" then {len(sessions) - killed} to finish; total {total:.0f} s <= budget {budget:.0f} s (1.5 x {t_ref:.0f}"
          f" + {len(sessions) - 1} x {t_start:.0f} session start-ups + {killed} x {t_trial:.0f} trial start-ups + "
          f"{stops:.0f} s of stops)")
    assert killed >= 10
    assert total <= budget, (total, budget, sessions)
