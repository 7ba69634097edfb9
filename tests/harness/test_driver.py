"""harness.driver with the grid and study policies, without Ray or MLflow: retry, interruption, resume, pruning.

A :class:`~tests.harness.fakes.FakeLauncher` plays scripted attempts and a
:class:`~tests.harness.fakes.MemoryRecorder` keeps the runs (test_mlflow_io.py checks it behaves like the
MLflow recorder). Interruption is injected at every single launcher and recorder call of a grid and of a
study, by the stop flag and by real SIGINT/SIGTERM, and each interrupted session is then resumed.
"""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from ddsm.config import ConfigError
from harness.cells import expand
from harness.console import StudyLog
from harness.driver import StopFlag, TrialOutcome, drive, stop_on_signals
from harness.grid import GridPolicy
from harness.optuna_study import StudyBook, open_study
from harness.spec import parse_spec
from harness.study import StudyPolicy
from harness.tune_spec import parse_tune_spec
from tests.harness.fakes import FakeLauncher, MemoryRecorder, default_script, drive_grid, failing_script


class Interrupter:
    """A hook that stops the driver at its ``at``-th call: sets the flag, or sends ``signals`` to this process."""

    def __init__(self, at: int, stop: StopFlag | None = None, signals: tuple[int, ...] = ()) -> None:
        self.at, self.stop, self.signals, self.calls = at, stop, list(signals), 0

    def __call__(self, name: str) -> None:
        self.calls += 1
        if self.calls >= self.at and self.signals:
            os.kill(os.getpid(), self.signals.pop(0))  # the handler runs before kill() returns
        elif self.calls == self.at and self.stop is not None:
            self.stop.set(signal.SIGTERM)


# ============================================================================ the grid


@pytest.fixture(scope="module")
def grid():
    """4 cells (fpn and sfnet x 2 seeds), one retry allowed."""
    spec = parse_spec({"name": "g", "base": {"train": {"steps": 4}},
                       "baselines": [{"name": "fpn", "overrides": {"model.name": "fpn"}},
                                     {"name": "sfnet", "overrides": {"model.name": "sfnet"}}],
                       "seeds": [0, 1], "max_failures": 1})
    return spec, expand(spec)


def _grid(grid, out: Path, recorder: MemoryRecorder, launcher: FakeLauncher, *, stop: StopFlag | None = None,
          limit: int = 2) -> tuple[GridPolicy, bool]:
    policy, _, interrupted = drive_grid(grid, out, recorder, launcher, stop=stop, limit=limit)
    return policy, interrupted


def _fails_first(classes: dict[int, str]):
    """A script whose attempt ``n`` (1-based, per key) fails with ``classes[n]``; the others run normally."""
    def script(payload):
        cls = classes.get(payload.attempt)
        return failing_script(cls) if cls else default_script(payload)

    return script


def test_grid_runs_every_cell_once_and_records_it(grid, tmp_path: Path):
    recorder, launcher = MemoryRecorder(), FakeLauncher()
    policy, interrupted = _grid(grid, tmp_path, recorder, launcher)
    assert not interrupted and launcher.closed is False
    assert [r.status for r in policy.results] == ["finished"] * 4
    assert sorted(p.key for p in launcher.submitted) == sorted(c.hash for c in grid[1])
    for r in policy.results:
        (run,) = recorder.by_hash()[r.cell.hash]
        assert run.status == "FINISHED" and run.tags["variant"] == r.cell.variant
        assert (run.tags["device"], run.tags["failure_class"], run.tags["attempts"]) == ("cpu", "none", "1")
        assert ("loss", 1.0, 1) in run.metrics  # per-step train metrics
        assert recorder.final_metrics(run.run_id)["miou"] == r.metrics["miou"]  # final metrics at the last step
        assert r.last_miou == r.metrics["miou"] and r.step == 4


def test_the_launcher_is_told_how_many_attempts_wait_behind_the_running_ones(grid, tmp_path: Path):
    """drive() passes Policy.queued() to Launcher.prepare every step: 4 cells, 1 at a time -> 3, 2, 1, 0 waiting
    (each for as many steps as an attempt runs), never more than the cells not launched yet."""
    launcher = FakeLauncher()
    _, interrupted = _grid(grid, tmp_path, MemoryRecorder(), launcher, limit=1)
    assert not interrupted
    assert list(dict.fromkeys(launcher.prepared)) == [3, 2, 1, 0]
    assert launcher.prepared == sorted(launcher.prepared, reverse=True)


def test_events_that_come_after_their_attempt_ended_are_all_recorded(grid, tmp_path: Path):
    """The Ray launcher's event queue answers a step late: an attempt's last events (final eval, end) may come
    after its task returned. Every one must reach the run as without lag, and the freed slot is reused at
    once (the next attempt launches before the ended one is recorded)."""
    runs = {}
    for lag in (0, 4):
        calls: list[str] = []
        recorder, launcher = MemoryRecorder(), FakeLauncher(hook=calls.append, event_lag=lag)
        policy, interrupted = _grid(grid, tmp_path / f"lag{lag}", recorder, launcher, limit=1)
        assert not interrupted and [r.status for r in policy.results] == ["finished"] * 4
        runs[lag] = {h: sorted(r.metrics) for h, (r,) in recorder.by_hash().items()}
        assert runs[lag] == runs[0], lag
        if lag:  # a settling attempt does not hold its slot: submit, then the ended one's outcome
            assert calls[:calls.index("outcome")].count("submit") == 2


@pytest.mark.parametrize("classes, statuses, launches", [
    ({1: "error"}, "finished", 2),  # retried once (max_failures 1)
    ({1: "oom", 2: "killed"}, "failed", 2),  # retries used up
    ({1: "nan"}, "failed", 1),  # nan is not in retry_on
])
def test_grid_retries_the_classes_it_may(grid, tmp_path: Path, classes, statuses, launches):
    recorder, launcher = MemoryRecorder(), FakeLauncher(_fails_first(classes))
    policy, _ = _grid(grid, tmp_path, recorder, launcher, limit=1)
    for r in policy.results:
        assert (r.status, r.attempts, launcher.launches(r.cell.hash)) == (statuses, launches, launches)
        (run,) = recorder.by_hash()[r.cell.hash]
        assert run.status == statuses.upper()
        assert run.tags["failures"] == ",".join(classes[i] for i in range(1, launches + 1) if i in classes)
        assert (tmp_path / "cells" / r.cell.hash / "error.txt").read_text().startswith("injected")
    # a retry goes first: each cell's attempts are back to back
    keys = [p.key for p in launcher.submitted]
    assert keys == [k for k in dict.fromkeys(keys) for _ in range(launches)]


def test_grid_resume_skips_finished_records_unrecorded_and_reuses_runs(grid, tmp_path: Path):
    recorder = MemoryRecorder()
    stop = StopFlag()
    first = FakeLauncher(hook=lambda name: stop.set() if recorder.by_hash() and any(
        r.status == "FINISHED" for runs in recorder.by_hash().values() for r in runs) else None)
    policy, interrupted = _grid(grid, tmp_path, recorder, first, stop=stop, limit=1)
    assert interrupted
    done = {r.cell.hash for r in policy.results if r.status == "finished"}
    killed = {r.cell.hash for r in policy.results if r.status == "killed"}
    assert done and killed and not {r.status for r in recorder.children()} & {"RUNNING"}
    # a cell that trained to the end while no driver recorded it (its result.json is on disk)
    orphan = next(c for c in grid[1] if c.hash not in done | killed)
    (tmp_path / "cells" / orphan.hash).mkdir(parents=True)
    (tmp_path / "cells" / orphan.hash / "result.json").write_text(
        json.dumps({"eval_hash": orphan.eval_hash, "metrics": {"miou": 0.123}}))

    second = FakeLauncher()
    policy, interrupted = _grid(grid, tmp_path, recorder, second)
    assert not interrupted and all(r.done for r in policy.results)
    status = {r.cell.hash: r.status for r in policy.results}
    assert {status[h] for h in done} == {"skipped"} and status[orphan.hash] == "finished"
    assert {p.key for p in second.submitted} == {c.hash for c in grid[1]} - done - {orphan.hash}
    assert recorder.final_metrics(recorder.by_hash()[orphan.hash][0].run_id)["miou"] == 0.123
    assert all(len(runs) == 1 and runs[0].status == "FINISHED" for runs in recorder.by_hash().values())


def _grid_calls(grid, tmp_path: Path) -> int:
    counter = Interrupter(at=10**9)
    _grid(grid, tmp_path / "count", MemoryRecorder(hook=counter), FakeLauncher(hook=counter))
    return counter.calls


def test_grid_interrupted_at_any_call_loses_nothing_and_resumes(grid, tmp_path: Path):
    """Stop at the k-th launcher/recorder call, for every k (every 5th by SIGINT/SIGTERM instead of the flag)."""
    reference = {c.hash: default_script_metrics(c.hash) for c in grid[1]}
    n = _grid_calls(grid, tmp_path)
    assert n > 50
    for k in range(1, n + 1):
        out = tmp_path / f"k{k}"
        by_signal = k % 5 == 0
        with stop_on_signals() as stop:
            hook = Interrupter(k, stop, signals=(signal.SIGINT if k % 2 else signal.SIGTERM,) if by_signal else ())
            recorder = MemoryRecorder(hook=hook)
            policy, interrupted = _grid(grid, out, recorder, FakeLauncher(hook=hook), stop=stop)
        assert interrupted, k
        assert stop.signum == (signal.SIGINT if by_signal and k % 2 else signal.SIGTERM), k
        assert stop.message == (f"{signal.Signals(stop.signum).name} received" if by_signal else ""), k
        assert not [r for r in recorder.children() if r.status == "RUNNING"], k  # every run closed
        on_disk = {c.hash for c in grid[1] if (out / "cells" / c.hash / "result.json").is_file()}
        finished = {h for h, runs in recorder.by_hash().items() if any(r.status == "FINISHED" for r in runs)}
        assert on_disk <= finished, k  # nothing that finished is lost
        recorder.hook = lambda name: None
        again = FakeLauncher()
        policy, interrupted = _grid(grid, out, recorder, again)
        assert not interrupted and all(r.done for r in policy.results), k
        assert not finished & {p.key for p in again.submitted}, k  # a finished cell never trains again
        assert all(len(runs) == 1 and runs[0].status == "FINISHED" for runs in recorder.by_hash().values()), k
        assert {r.cell.hash: r.metrics["miou"] for r in policy.results} == reference, k


def default_script_metrics(cell_hash: str) -> float:
    """The final miou :func:`default_script` gives a cell."""
    return (int(cell_hash[:4], 16) % 1000) / 1000


def test_a_second_ctrl_c_aborts_the_step_and_a_resume_repairs_the_rest(grid, tmp_path: Path):
    n = _grid_calls(grid, tmp_path)
    for k in range(3, n, 7):
        out = tmp_path / f"k{k}"
        with stop_on_signals() as stop:
            hook = Interrupter(k, signals=(signal.SIGINT, signal.SIGINT))  # the second raises KeyboardInterrupt
            recorder = MemoryRecorder(hook=hook)
            try:
                _, interrupted = _grid(grid, out, recorder, FakeLauncher(hook=hook), stop=stop)
                assert interrupted, k
            except KeyboardInterrupt:  # it landed in the clean-up itself: the CLI exits 130
                pass
        recorder.hook = lambda name: None
        policy, interrupted = _grid(grid, out, recorder, FakeLauncher())
        assert not interrupted and all(r.done for r in policy.results), k
        assert all(any(r.status == "FINISHED" for r in runs) for runs in recorder.by_hash().values()), k


def test_a_retry_waiting_at_the_interruption_is_closed(grid, tmp_path: Path):
    stop, tags = StopFlag(), []

    def at_the_failure(name: str) -> None:  # set_tags #1: its failure (the retry is queued; launch tags go with
        tags.append(name) if name == "set_tags" else None  # the run's creation)
        if len(tags) == 1:
            stop.set()

    recorder, launcher = MemoryRecorder(hook=at_the_failure), FakeLauncher(_fails_first({1: "error"}))
    policy, interrupted = _grid(grid, tmp_path, recorder, launcher, stop=stop, limit=1)
    assert interrupted and [r.status for r in policy.results] == ["killed", "pending", "pending", "pending"]
    assert len(launcher.submitted) == 1  # the retry was never launched, and its run is closed
    assert [r.status for r in recorder.children()] == ["KILLED"]


# ============================================================================ the study


def _study_spec(tiny_study, **search):
    return parse_tune_spec(tiny_study(**search))


def _study(spec, study, out: Path, recorder: MemoryRecorder, launcher: FakeLauncher, *, budget: int, limit: int = 1,
           stop: StopFlag | None = None) -> tuple[StudyPolicy, bool]:
    parent = recorder.start_parent(key="study", name="s", tags={}, params={})
    log = StudyLog(Console(file=io.StringIO()))
    policy = StudyPolicy(spec=spec, book=StudyBook(study), recorder=recorder, parent=parent, out=out, sha="sha",
                         budget=budget, limit=limit, log=log)
    stop = stop if stop is not None else StopFlag()
    return policy, drive(policy, launcher, recorder, log, limit=limit, stop=stop)


def _new_study(spec):
    return open_study(spec, storage=optuna.storages.InMemoryStorage(), study_name="s",
                      rung_step=spec.base_config.train.val_every, total_steps=spec.base_config.train.steps)


def _by_lr(payload):
    """Trials scored by their learning rate (a higher lr scores higher)."""
    return default_script(payload, score=lambda p: min(1.0, p.config["train"]["lr"] * 10))


def test_study_prunes_at_the_first_validation_and_counts_verdicts(tiny_study, tmp_path: Path):
    spec = _study_spec(tiny_study)
    study, recorder, launcher = _new_study(spec), MemoryRecorder(), FakeLauncher(_by_lr)
    policy, interrupted = _study(spec, study, tmp_path, recorder, launcher, budget=6)
    assert not interrupted and policy.finished == 6
    assert list(dict.fromkeys(launcher.prepared)) == [5, 4, 3, 2, 1, 0]  # the budget's trials not asked for yet
    states = {t.number: t.state for t in study.trials}
    pruned = [n for n, s in states.items() if s == TrialState.PRUNED]
    assert pruned and len(study.trials) == 6
    assert sorted(int(p.key[5:]) for p in launcher.cancelled) == pruned  # a pruned attempt is stopped
    for t in study.trials:
        run = recorder.runs[t.user_attrs["mlflow_run_id"]]
        want = {TrialState.COMPLETE: ("FINISHED", "COMPLETE"), TrialState.PRUNED: ("KILLED", "PRUNED")}[t.state]
        assert (run.status, run.tags["optuna_state"]) == want
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["pruned_at_step"] == 2 and list(t.intermediate_values) == [2]


def test_killed_trial_is_requeued_once_into_its_folder(tiny_study, tmp_path: Path):
    spec = _study_spec(tiny_study, pruning=False)
    study, recorder = _new_study(spec), MemoryRecorder()
    killed_twice = FakeLauncher(lambda p: failing_script("killed") if p.cell_dir.endswith("0000")
                                else default_script(p))
    policy, _ = _study(spec, study, tmp_path, recorder, killed_twice, budget=2)
    first, requeued, *others = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"]
    assert requeued.user_attrs["requeued_from"] == 0 and requeued.params == first.params
    assert requeued.user_attrs["trial_dir"] == first.user_attrs["trial_dir"]
    assert requeued.state == TrialState.FAIL and "interrupted" not in requeued.user_attrs  # the second kill counts
    assert [t.state for t in others] == [TrialState.COMPLETE] and policy.finished == 2


def test_trials_left_running_by_a_dead_driver_are_failed_and_requeued(tiny_study, tmp_path: Path):
    spec = _study_spec(tiny_study, pruning=False)
    study, recorder = _new_study(spec), MemoryRecorder()
    orphan = study.ask()
    run = recorder.start_run(name="trial 0", parent_id="p", cell_hash="h", params={}, tags={})
    orphan.set_user_attr("mlflow_run_id", run)
    orphan.set_user_attr("trial_dir", str(tmp_path / "trials" / "0000"))
    _study(spec, study, tmp_path, recorder, FakeLauncher(), budget=1)
    assert study.trials[0].state == TrialState.FAIL and recorder.runs[run].status == "KILLED"
    assert study.trials[1].user_attrs["requeued_from"] == 0 and study.trials[1].state == TrialState.COMPLETE
    assert study.trials[1].user_attrs["trial_dir"] == str(tmp_path / "trials" / "0000")


def test_a_config_that_cannot_run_fails_its_trial_and_the_study_goes_on(tiny_study, tmp_path: Path, monkeypatch):
    spec = _study_spec(tiny_study, pruning=False)
    study, resolve, asked = _new_study(spec), spec.trial_config, []

    def first_cannot_run(params):  # valid values whose combination is not a valid config
        asked.append(params)
        if len(asked) == 1:
            raise ConfigError("model.pooled_size=8 is not allowed with these values")
        return resolve(params)

    monkeypatch.setattr(spec, "trial_config", first_cannot_run)
    recorder, launcher = MemoryRecorder(), FakeLauncher()
    policy, _ = _study(spec, study, tmp_path, recorder, launcher, budget=2)
    bad, good = study.trials
    assert bad.state == TrialState.FAIL and bad.user_attrs["failure_class"] == "error"
    assert "not allowed" in bad.user_attrs["error"] and good.state == TrialState.COMPLETE
    assert policy.finished == 2 and [p.key for p in launcher.submitted] == ["trial0001"]
    runs = {r.tags["optuna_trial"]: r for r in recorder.children()}
    assert (runs["0"].status, runs["0"].tags["cell_hash"], runs["1"].status) == ("FAILED", "", "FINISHED")


def test_study_interrupted_at_any_call_keeps_verdicts_and_resumes(tiny_study, tmp_path: Path):
    spec = _study_spec(tiny_study, pruning=False)
    counter = Interrupter(at=10**9)
    _study(spec, _new_study(spec), tmp_path / "count", MemoryRecorder(hook=counter), FakeLauncher(hook=counter),
           budget=3, limit=2)
    n = counter.calls
    assert n > 30
    for k in range(1, n + 1):
        out = tmp_path / f"k{k}"
        study = _new_study(spec)
        with stop_on_signals() as stop:
            hook = Interrupter(k, stop, signals=(signal.SIGINT,) if k % 5 == 0 else ())
            recorder = MemoryRecorder(hook=hook)
            policy, interrupted = _study(spec, study, out, recorder, FakeLauncher(hook=hook), budget=3, limit=2,
                                         stop=stop)
        assert interrupted, k
        assert not [t for t in study.trials if t.state == TrialState.RUNNING], k
        assert not [r for r in recorder.children() if r.status == "RUNNING"], k
        for t in study.trials:
            run = recorder.runs.get(t.user_attrs.get("mlflow_run_id", ""))
            if t.state == TrialState.COMPLETE:
                assert run.status == "FINISHED", k
            if t.state == TrialState.FAIL:
                assert t.user_attrs["interrupted"] and run.status == "KILLED", k
                (waiting,) = [w for w in study.trials if w.user_attrs.get("requeued_from") == t.number]
                assert waiting.state == TrialState.WAITING and waiting.system_attrs["fixed_params"] == t.params, k
        complete = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
        recorder.hook = lambda name: None
        policy, interrupted = _study(spec, study, out, recorder, FakeLauncher(), budget=3, limit=2)
        assert not interrupted and policy.finished == 3, k
        assert [t.number for t in study.trials] == list(range(len(study.trials))), k
        assert all(study.trials[n].values == v for n, v in complete.items()), k
        assert not [r for r in recorder.children() if r.status == "RUNNING"], k


def test_stop_flag_from_a_signal_only_in_the_main_thread():
    import threading

    seen = []

    def worker():
        with stop_on_signals() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
            stop.set()
            seen.append(bool(stop))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler, True]
    assert TrialOutcome(status="finished").finished and not TrialOutcome(status="failed").finished


def test_sigterm_outside_the_driver_loop_exits_130_naming_the_signal(monkeypatch, capsys):
    """The preamble (and what follows the loop) turns SIGTERM into Ctrl-C; the exit line says which signal it was."""
    from harness import cli, cmd_run

    def run(args):  # noqa: ANN001, ANN202 - stands in for the grid's preamble
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cmd_run, "run", run)
    assert cli.main(["run", "spec.yaml"]) == 130
    assert "ddsm-bench run: interrupted by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored
