"""``python tools/gpu_check.py``: its stages' bookkeeping and its kernels' cases on CPU.

The whole dry run (``--cpu-dry-run``, every stage) runs in CI from ``.ci/run``; here are the
parts that decide its exit status.
"""
import json
import sys

import pytest
import torch

import gpu_check  # tools/, on sys.path through pyproject.toml's pythonpath

from shared import needs_extension


def test_a_failing_stage_fails_the_check(tmp_path, monkeypatch, capsys):
    """A stage whose command fails is recorded as failed, the JSON says so, the exit status is 1,
    and the stages after it still run."""
    def commands(stage, dry, tmp, tests):
        code = 3 if stage == "loss" else 0
        return [[sys.executable, "-c", f"print('{stage} ran'); raise SystemExit({code})"]]

    monkeypatch.setattr(gpu_check, "_commands", commands)
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--stages", "loss,pocket"])
    assert rc == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is False
    assert result["stages"]["loss"]["status"] == "failed"
    assert "exit status 3" in result["stages"]["loss"]["notes"][0]
    assert result["stages"]["pocket"]["status"] == "ok"
    log = (tmp_path / "gpu_check.log").read_text()
    assert "loss ran" in log and "pocket ran" in log
    assert "gpu_check: FAILED" in capsys.readouterr().out


def test_a_hanging_stage_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_commands", lambda stage, dry, tmp, tests: [
        [sys.executable, "-c", "import time; time.sleep(60)"]])
    monkeypatch.setitem(gpu_check.LIMITS, "steps", 1)
    assert gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--stages", "steps"]) == 1
    notes = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["steps"]["notes"]
    assert notes == ["stopped after 1 s"]


def test_the_budget_stops_the_run_and_keeps_the_results(tmp_path, monkeypatch):
    """Past ``--budget`` the running command is stopped and later ones are not started; the
    stages before keep their results."""
    monkeypatch.setattr(gpu_check, "_commands", lambda stage, dry, tmp, tests: [
        [sys.executable, "-c", "import time; time.sleep(60 if %r == 'steps' else 0)" % stage]] * 2)
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--stages",
                         "pocket,steps,tests", "--budget", "3"])
    assert rc == 1
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["pocket"]["status"] == "ok"
    assert stages["steps"]["notes"][0].startswith("stopped after")
    assert stages["tests"]["notes"][0].startswith("not run: the time was up")


def test_the_tests_stage_reads_pytest_counts(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"><failure/>'
        '</testcase><testcase classname="a" name="t3"><skipped/></testcase></testsuite>'
        '</testsuites>')
    r = gpu_check._collect("tests", tmp_path)
    assert r == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["a::t2"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_without_a_gpu_it_points_to_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--stages", "env"])
    assert "--cpu-dry-run" in capsys.readouterr().err


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-dry-run", "--stages", "env,speed"])
    assert "unknown stage" in capsys.readouterr().err


@needs_extension
def test_sanitizer_cases_match_the_reference_on_cpu():
    """The cases run under compute-sanitizer on a GPU; here the C++ kernels run them."""
    errors = gpu_check.sanitizer_cases("cpu")
    assert len(errors) == 6
    assert all(0 <= err < 2e-2 for err in errors.values()), errors
    assert errors["pocket mlp"] < 1e-4 and errors["loss float32 (4, 9000)"] < 1e-5
