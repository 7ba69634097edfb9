"""``ddsm-bench train`` / ``ddsm-bench evaluate``: bad configs exit 2 with one line; outputs; evaluate agrees."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main

from tests.conftest import TINY_BASE

TINY = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 3}}  # the shared tiny trial, 3 steps


def _sets(cfg: dict) -> list[str]:
    """``--set key=value`` arguments for every field of a (nested) config dict."""
    from harness.spec import flatten

    return [arg for key, value in flatten(cfg).items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_key_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  stpes: 10\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "train.stpes" in line and "10" in line and "train.steps" in line  # key, value, allowed keys
    assert not (tmp_path / "run").exists()


def test_wrong_type_exits_2_naming_key_value_and_type(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["train", "--set", "train.lr=fast", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "train.lr" in line and "'fast'" in line and "float" in line


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "nope.yaml" in _one_error_line(capsys)


def test_evaluate_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in _one_error_line(capsys)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step CLI training run shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *_sets(TINY), "--out", str(out)]) == 0
    return out


def test_train_writes_config_metrics_and_checkpoint(trained_run: Path):
    for name in ("config.yaml", "metrics.json", "per_class_iou.csv", "confusion.csv", "log.jsonl",
                 "checkpoints/last.pt"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("miou", "pixel_acc", "mean_acc", "bf_1px", "bf_2px", "biou", "per_class_iou", "class_names",
                "tolerances_px"):
        assert key in metrics, key
    assert metrics["step"] == 3 and len(metrics["per_class_iou"]) == 8 and metrics["amp_dtype"] == "float32"
    assert "gflops" in metrics or "cost_error" in metrics
    assert "steps: 3" in (trained_run / "config.yaml").read_text()
    confusion = (trained_run / "confusion.csv").read_text().splitlines()
    assert len(confusion) == 1 + 8 and confusion[1].startswith("sky,")


def test_evaluate_prints_the_metrics_of_metrics_json(trained_run: Path, capsys: pytest.CaptureFixture):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((trained_run / "metrics.json").read_text())
    for key in ("miou", "pixel_acc", "mean_acc", "bf_1px", "bf_2px", "biou", "per_class_iou", "num_images"):
        assert printed[key] == saved[key], key


def test_evaluate_rejects_overriding_the_model(trained_run: Path, capsys: pytest.CaptureFixture):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_run), "--set", "model.name=ddsm"]) == 2
    line = _one_error_line(capsys)
    assert "model.name" in line and "eval.*" in line


def test_rerunning_train_resumes_instead_of_restarting(trained_run: Path, capsys: pytest.CaptureFixture):
    before = (trained_run / "checkpoints" / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", *_sets(TINY), "--out", str(trained_run), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["step"] == 3
    assert "step 1/3" not in out.err  # no update was repeated
    assert (trained_run / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_the_console_script_exits_with_mains_code_and_skips_the_final_collection(monkeypatch: pytest.MonkeyPatch):
    """``ddsm-bench`` (harness.cli:entry) exits with main()'s code, after freezing the collector so that the
    interpreter's last collections do not walk torch's objects at exit."""
    import gc

    from harness import cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.entry()
        assert exit_.value.code == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on collecting
