"""The medic-fast command: help texts, the demo, and sanitize on a user's model and data."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from medic_fast import cli
from medic_fast.zoo import models


def _subparsers():
    parser = cli._parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_help_explains_every_option(capsys):
    parser, subs = _subparsers()
    assert set(subs) == {"demo", "sanitize", "scan", "bench"}
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in subs)
    for name, sub in subs.items():
        assert sub.description
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert all(opt in text for a in sub._actions for opt in a.option_strings)


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "medic_fast.cli", "sanitize", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--weights" in r.stdout and "--checkpoint" not in r.stdout
    assert "never overwrites" in r.stdout.lower()


def test_demo_refuses_an_existing_out_file(tmp_path, capsys):
    out = tmp_path / "demo.json"
    out.write_text("mine")
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert out.read_text() == "mine" and "never overwritten" in capsys.readouterr().err


def test_free_name_never_reuses_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli._free_name("medic-fast-demo", ".json") == "medic-fast-demo.json"
    (tmp_path / "medic-fast-demo.json").write_text("x")
    (tmp_path / "medic-fast-demo-1.json").write_text("x")
    assert cli._free_name("medic-fast-demo", ".json") == "medic-fast-demo-2.json"


def test_demo_meets_its_targets(tmp_path, monkeypatch, capsys):
    """The README's demo: MEDIC takes ASR from >90% to <=10% within 3 points of the trojaned
    model's accuracy; fine-tuning leaves the backdoor; well under 3 minutes."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "medic" in out and "plain cloning" in out and "wrote medic-fast-demo.json" in out
    assert "ACC: accuracy" in out and "ASR: attack success rate" in out
    result = json.loads((tmp_path / "medic-fast-demo.json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["trojaned"]["asr"] > 0.9
    assert rows["medic"]["asr"] <= 0.10
    assert rows["medic"]["acc"] >= rows["trojaned"]["acc"] - 0.03
    assert rows["finetune"]["asr"] > 0.5
    assert result["phases"]["total"] < 180 and result["threads"] == 1
    assert list(result["phases"])[:2] == ["extension", "data"]  # built before any timed phase
    assert torch.get_num_threads() == threads  # restored


def test_sanitize_command_on_user_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermod.py").write_text(textwrap.dedent("""
        import torch
        from medic_fast import data
        from medic_fast.zoo import attacks, datasets, models

        def model():
            return models.DigitsCNN((4, 8, 8))

        def clean():
            X, y = datasets.load_digits()
            return X[:128], y[:128]

        def held_out():
            X, y = datasets.load_digits()
            return X[-200:], y[-200:]

        trigger = attacks.BadNets(size=3)
    """))
    torch.manual_seed(0)
    weights = tmp_path / "in.pt"
    torch.save({"state_dict": models.DigitsCNN((4, 8, 8)).state_dict()}, weights)
    before = weights.read_bytes()
    args = ["sanitize", "--model", "usermod:model", "--weights", str(weights),
            "--data", "usermod:clean", "--out", "clone.pt", "--epochs", "2", "--no-progress",
            "--eval-data", "usermod:held_out", "--trigger", "usermod:trigger", "--target", "0",
            "--history", "history.json"]
    assert cli.main(args) == 0
    assert "wrote clone.pt" in capsys.readouterr().out
    clone = models.DigitsCNN((4, 8, 8))
    clone.load_state_dict(torch.load("clone.pt", weights_only=True))
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 2 and {"acc", "asr"} <= set(history[-1])
    assert weights.read_bytes() == before
    assert cli.main(args) == 2  # never overwrites its output
    assert "never overwritten" in capsys.readouterr().err
    os.remove("clone.pt")
    os.remove("history.json")
    capsys.readouterr()
    assert cli.main(args[:2] + ["usermod:nothing"] + args[3:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medic-fast: error: --model 'usermod:nothing'") and "no attribute" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(args[:-6] + ["--target", "0"]) == 2  # --target without --trigger


def test_scan_without_clear_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    import medic_fast

    monkeypatch.delattr(medic_fast, "scan", raising=False)
    torch.save(models.MLP().state_dict(), tmp_path / "m.pt")
    code = cli.main(["scan", "--model", "medic_fast.zoo.models:MLP", "--weights",
                     str(tmp_path / "m.pt"), "--data", "medic_fast.data:load_swiss_roll"])
    assert code == 2 and "CLEAR scanner" in capsys.readouterr().err


def test_bench_command_prints_figures_and_progress(capsys):
    args = ["bench", "--batch", "2", "--size", "8", "--repeats", "1", "--warmup", "1"]
    assert cli.main(args + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert set(json.loads(out)["seconds"]) == {"plain", "ours", "cached", "released"}
    assert err.count("bench: round") == 2
    assert cli.main(args + ["--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "ours" in out and "x plain" in out and err == ""


# --------------------------------------------------------------------------------------------
# Output paths are checked before any work; --backend
# --------------------------------------------------------------------------------------------

@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A user's model factory, data and weights in the cwd; the sanitize arguments for them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermod.py").write_text(textwrap.dedent("""
        from medic_fast.zoo import datasets, models

        def model():
            return models.DigitsCNN((4, 8, 8))

        def clean():
            X, y = datasets.load_digits()
            return X[:64], y[:64]
    """))
    torch.manual_seed(0)
    torch.save(models.DigitsCNN((4, 8, 8)).state_dict(), tmp_path / "in.pt")
    return ["--model", "usermod:model", "--weights", "in.pt", "--data", "usermod:clean",
            "--no-progress"]


def _no_work(monkeypatch):
    """Make any training or scanning fail the test."""
    import medic_fast

    def fail(*args, **kwargs):
        raise AssertionError("the command started working before rejecting its arguments")
    monkeypatch.setattr(medic_fast, "sanitize", fail)
    monkeypatch.setattr(medic_fast, "scan", fail)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("medic-fast: error: ") and err.count("\n") == 1, err
    assert ".tmp" not in err
    return err


def test_sanitize_checks_every_output_path_before_any_work(user_files, tmp_path, monkeypatch,
                                                           capsys):
    _no_work(monkeypatch)
    (tmp_path / "taken.pt").write_text("mine")
    (tmp_path / "adir").mkdir()
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.basename(p) == "ro"
                        else real_access(p, mode, **kw))
    missing = str(tmp_path / "nonexistent" / "dir" / "o.pt")
    cases = [
        (["--out", missing], f"--out {missing!r}: directory {os.path.dirname(missing)!r} "
                             "does not exist; create it"),
        (["--out", "adir"], "--out 'adir': is a directory; give a file path"),
        (["--out", "taken.pt/o.pt"], "is not a directory"),
        (["--out", "ro/o.pt"], "is not writable"),
        (["--out", "taken.pt"], "--out 'taken.pt': exists and is never overwritten; choose"),
        (["--out", "o.pt", "--state", "nonexistent/s.pt"], "--state 'nonexistent/s.pt': "
                                                            "directory"),
        (["--out", "o.pt", "--state", "taken.pt"], "--state 'taken.pt': exists; pass --resume"),
        (["--out", "o.pt", "--resume"], "--resume: needs --state"),
        (["--out", "o.pt", "--history", "nonexistent/h.json"], "--history 'nonexistent/h.json'"),
        (["--out", "o.pt", "--history", "./o.pt"], "--history './o.pt': is the same file as "
                                                    "--out 'o.pt'"),
        (["--out", "o.pt", "--state", "s.pt", "--history", "s.pt"], "--history 's.pt': is the "
                                                                    "same file as --state"),
    ]
    for extra, message in cases:
        assert cli.main(["sanitize", *user_files, *extra]) == 2, extra
        assert message in _error(capsys), extra
    assert sorted(os.listdir(tmp_path)) == ["adir", "in.pt", "ro", "taken.pt", "usermod.py"]
    assert (tmp_path / "taken.pt").read_text() == "mine"


def test_sanitize_save_errors_name_the_flag_and_path(user_files, tmp_path, monkeypatch, capsys):
    """--out's directory vanishes during training: one line naming --out, not a traceback about
    a temp file."""
    import types

    import medic_fast

    (tmp_path / "out").mkdir()

    def sanitize(*args, **kwargs):
        os.rmdir(tmp_path / "out")
        return types.SimpleNamespace(model=torch.nn.Linear(1, 1),
                                     history=[{"epoch": 1, "loss": 0.5}])
    monkeypatch.setattr(medic_fast, "sanitize", sanitize)
    assert cli.main(["sanitize", *user_files, "--out", "out/o.pt"]) == 2
    assert _error(capsys).startswith("medic-fast: error: --out 'out/o.pt': cannot write it: ")


def test_demo_checks_its_output_path_first(tmp_path, monkeypatch, capsys):
    import medic_fast.zoo.demo

    def fail(*args, **kwargs):
        raise AssertionError("the demo ran before rejecting --out")
    monkeypatch.setattr(medic_fast.zoo.demo, "run_demo", fail)
    out = str(tmp_path / "missing" / "demo.json")
    assert cli.main(["demo", "--out", out]) == 2
    assert f"--out {out!r}: directory" in _error(capsys)


def test_backend_option_is_passed_through(user_files, monkeypatch, capsys):
    import types

    import medic_fast

    _, subs = _subparsers()
    for name, names in (("sanitize", ("auto", "reference", "cpp", "triton")),
                        ("scan", ("auto", "reference", "cpp", "cuda"))):
        action = next(a for a in subs[name]._actions if a.dest == "backend")
        assert tuple(action.choices) == names and action.default == "auto"  # what the op takes
        assert all(f"{b}:" in action.help for b in names)
    seen = {}

    def sanitize(*args, **kwargs):
        seen["sanitize"] = kwargs["backend"]
        return types.SimpleNamespace(model=torch.nn.Linear(1, 1),
                                     history=[{"epoch": 1, "loss": 0.5}])

    def scan(*args, **kwargs):
        seen["scan"] = kwargs["backend"]
        return types.SimpleNamespace(verdict="clean", to_json=lambda: "{}")
    monkeypatch.setattr(medic_fast, "sanitize", sanitize)
    monkeypatch.setattr(medic_fast, "scan", scan)
    assert cli.main(["sanitize", *user_files, "--out", "o.pt", "--backend", "reference"]) == 0
    assert cli.main(["scan", *user_files[:-1], "--backend", "reference"]) == 0
    assert seen == {"sanitize": "reference", "scan": "reference"}
    capsys.readouterr()
    # a backend that cannot run the command's op here is refused before any work
    _no_work(monkeypatch)
    assert cli.main(["sanitize", *user_files, "--out", "o2.pt", "--backend", "triton"]) == 2
    assert "--backend 'triton': " in _error(capsys)
    assert cli.main(["scan", *user_files[:-1], "--backend", "cuda"]) == 2
    assert "--backend 'cuda': " in _error(capsys)


def test_numeric_and_list_options_are_checked_by_the_parser(capsys):
    """Bad values are usage errors (rc 2, one line naming the option), not tracebacks; spaces
    around --layers names are ignored."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--repeats", "0"])
    assert e.value.code == 2 and "--repeats: must be an integer >= 1, got 0" in \
        capsys.readouterr().err
    args = cli._parser().parse_args(["sanitize", "--model", "m:f", "--weights", "c.pt",
                                     "--data", "d:f", "--out", "o.pt", "--layers", "a, b ,c"])
    assert args.layers == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------
# --weights and --state files that cannot be used; Ctrl-C
# --------------------------------------------------------------------------------------------

def test_weights_that_cannot_be_used_are_one_line_errors(user_files, tmp_path, monkeypatch,
                                                         capsys):
    """Unreadable (empty, random, cut short: not "Invalid argument"), a pickled module, a tensor,
    a training state, another architecture: one line naming --weights (and --model) and saying
    what the file holds, read with weights_only=True; before any work."""
    assert cli.main(["sanitize", *user_files, "--out", "o.pt", "--state", "s.pt", "--epochs", "1",
                     "--backend", "reference"]) == 0
    capsys.readouterr()
    _no_work(monkeypatch)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 256)) * 8)
    torch.save(models.DigitsCNN((4, 8, 8)), tmp_path / "module.pt")
    whole = (tmp_path / "in.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(models.MLP().state_dict(), tmp_path / "mlp.pt")
    torch.save({"model": models.DigitsCNN((4, 8, 16)).state_dict()}, tmp_path / "wide.pt")
    cases = {
        "empty.pt": "--weights 'empty.pt': is not a readable weights file (the file is empty); "
                    "give the model's state_dict, saved with torch.save(model.state_dict(), PATH)",
        "random.pt": "--weights 'random.pt': is not a readable weights file (not a torch.save "
                     "file (neither a zip archive nor a pickle: it starts with b'\\x07\\x08')); "
                     "give",
        "cut.pt": f"--weights 'cut.pt': is not a readable weights file (a zip archive cut short "
                  f"at {len(whole) // 2} bytes: a truncated torch.save file); give",

        "module.pt": "(it holds a pickled medic_fast.zoo.models.DigitsCNN",
        "tensor.pt": "--weights 'tensor.pt': holds a Tensor, not a state_dict; give",
        "s.pt": "--weights 's.pt': is a training state written by --state, not model weights; "
                "to continue that run, pass it as --state 's.pt' with --resume",
        "mlp.pt": "--weights 'mlp.pt': does not fit --model 'usermod:model' (missing ",
        "wide.pt": "--weights 'wide.pt': does not fit --model 'usermod:model' (shape of ",
    }
    for name, message in cases.items():
        assert cli.main(["sanitize", *user_files, "--out", "o2.pt"]
                        + ["--weights", name]) == 2, name
        err = _error(capsys)
        assert message in err and "weights_only" not in err, (name, err)
    assert "; give the weights of that architecture, or the --model they were saved from" in err
    assert cli.main(["scan", *user_files[:-1], "--weights", "empty.pt"]) == 2
    assert "--weights 'empty.pt': is not a readable weights file" in _error(capsys)


def test_resume_checks_the_state_before_any_work(user_files, tmp_path, monkeypatch, capsys):
    """--resume from a --state that cannot be continued: one line in the command's words
    (--state, --resume, --epochs), never resume=True or checkpoint=PATH, before any work."""
    run = ["sanitize", *user_files, "--out", "o.pt", "--epochs", "1", "--backend", "reference"]
    assert cli.main(run + ["--state", "s.pt"]) == 0
    capsys.readouterr()
    _no_work(monkeypatch)
    os.remove("o.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    state = torch.load("s.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, "no-optimizer.pt")
    cases = [
        (["--state", "empty.pt"], "--state 'empty.pt': is not a readable medic_fast training "
                                  "state (the file is empty); give the --state file of the run "
                                  "to continue, with that run's --weights, --data and options, "
                                  "or another --state path without --resume"),
        (["--state", "no-optimizer.pt"], "(no 'optimizer' entry)"),
        (["--state", "in.pt"], "--state 'in.pt': is not a readable medic_fast training state "
                               "(it holds a model's state_dict, not a training state)"),
        (["--state", "s.pt", "--epochs", "3", "--lr", "0.5"],
         "--state 's.pt': was written by another run: --epochs 1 (now 3), --lr 0.01 (now 0.5); "
         "give the --state file of the run to continue, with that run's --weights, --data and "
         "options, or another --state path without --resume"),
        (["--state", "s.pt", "--layers", "features.0"], "--layers features.0,features.1,"),
    ]
    for extra, message in cases:
        assert cli.main(run + ["--resume", *extra]) == 2, extra
        err = _error(capsys)
        assert message in err and "resume=True" not in err and "checkpoint" not in err, err


SLOW_MODULE = """
import os
import time

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOWMOD_SLEEP", "0")))
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 1, 6, 6, generator=g)
    return X, torch.randint(3, (40,), generator=g)
"""


@pytest.mark.faults
def test_ctrl_c_during_sanitize_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """SIGINT to a real `medic-fast sanitize --state` after its first epoch: one line naming
    --resume, rc 130; the same command with --resume then continues from the saved epoch, to
    the clone of an uninterrupted run, bit for bit (with the teacher cache, on by default:
    batches of 12, 12, 12 and 4)."""
    import importlib
    import signal
    import time

    (tmp_path / "slowmod.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    torch.save(importlib.import_module("slowmod").Net().state_dict(), tmp_path / "in.pt")
    args = ["sanitize", "--model", "slowmod:Net", "--weights", "in.pt", "--data", "slowmod:data",
            "--out", "clone.pt", "--state", "state.pt", "--epochs", "100", "--batch-size", "12",
            "--backend", "reference", "--no-progress"]
    env = dict(os.environ, SLOWMOD_SLEEP="0.02", OMP_NUM_THREADS="1")
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. An earlier test in
    # this pytest process may leave SIGINT ignored, which a child would inherit (and Python then
    # installs no KeyboardInterrupt handler): give the child the default disposition.
    with subprocess.Popen([sys.executable, "-m", "medic_fast.cli", *args], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as p:
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "state.pt").exists() and p.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
    assert p.returncode == 130, err
    assert err == "medic-fast: interrupted; run the same command with --resume to continue from " \
        "the last completed epoch, saved in --state 'state.pt'\n"
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["history"]
    assert 1 <= len(saved) < 100 and not (tmp_path / "clone.pt").exists()
    monkeypatch.chdir(tmp_path)
    assert cli.main(args + ["--resume", "--history", "h.json"]) == 0
    history = json.loads((tmp_path / "h.json").read_text())
    assert len(history) == 100 and history[:len(saved)] == saved
    whole = [a.replace("clone.pt", "whole.pt").replace("state.pt", "whole-state.pt")
             for a in args]
    assert cli.main(whole) == 0
    clone, uninterrupted = (torch.load(tmp_path / f, weights_only=True)
                            for f in ("clone.pt", "whole.pt"))
    assert all(torch.equal(v, uninterrupted[k]) for k, v in clone.items())


def test_ctrl_c_without_state_says_state_would_allow_resuming(user_files, monkeypatch, capsys):
    import medic_fast

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(medic_fast, "sanitize", interrupted)
    assert cli.main(["sanitize", *user_files, "--out", "o.pt"]) == 130
    assert capsys.readouterr().err == "medic-fast: interrupted; --state PATH would have allowed " \
        "resuming (with --resume) from the last completed epoch\n"
    assert cli.main(["sanitize", *user_files, "--out", "o.pt", "--state", "s.pt"]) == 130
    assert capsys.readouterr().err == "medic-fast: interrupted before the first epoch completed; " \
        "run the same command again\n"


def test_bad_clean_data_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """The library's data errors (here a NaN sample) reach the user as one line, rc 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "nanmod.py").write_text(textwrap.dedent("""
        import torch
        from medic_fast.zoo import models

        def model():
            return models.DigitsCNN((4, 8, 8))

        def data():
            X = torch.rand(32, 1, 8, 8)
            X[5, 0, 2, 2] = float("nan")
            return X, torch.randint(10, (32,))
    """))
    torch.manual_seed(0)
    torch.save(models.DigitsCNN((4, 8, 8)).state_dict(), tmp_path / "in.pt")
    code = cli.main(["sanitize", "--model", "nanmod:model", "--weights", "in.pt", "--data",
                     "nanmod:data", "--out", "o.pt", "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sample 5" in err and "NaN" in err and not (tmp_path / "o.pt").exists()


def test_resume_refuses_other_weights_data_or_a_state_that_does_not_fit(user_files, tmp_path,
                                                                        capsys):
    """--resume with other --weights or --data than the run that wrote --state, or from a state
    whose epoch or tensors do not fit the run: rc 2 and one line naming --state and what
    differs, in the command's words, no clone written; the run's own files resume."""
    (tmp_path / "othermod.py").write_text(textwrap.dedent("""
        import torch

        def clean():
            return torch.rand(64, 1, 8, 8), torch.randint(10, (64,))
    """))
    run = ["sanitize", *user_files, "--out", "o.pt", "--epochs", "2", "--state", "s.pt"]
    assert cli.main(run) == 0
    os.remove("o.pt")
    capsys.readouterr()
    torch.save(models.DigitsCNN((4, 8, 8)).state_dict(), "other.pt")
    state = torch.load("s.pt", weights_only=True)
    torch.save(dict(state, epoch=-3), "bad_epoch.pt")
    shapes = dict(state["model"], **{"features.0.weight": torch.zeros(5, 1, 3, 3)})
    torch.save(dict(state, model=shapes), "bad_model.pt")
    cases = [
        (["--weights", "other.pt"], "--state 's.pt': was written by another run: --weights: "
                                    "other values (digest "),
        (["--data", "othermod:clean"], "--state 's.pt': was written by another run: --data: ",
         "other values in the sampled rows (digest "),
        (["--state", "bad_epoch.pt"], "--state 'bad_epoch.pt': does not fit this run: 'epoch' "
                                      "is -3, expected 1 to 2"),
        (["--state", "bad_model.pt"], "--state 'bad_model.pt': does not fit this run: 'model' "
                                      "does not fit the model (shape of features.0.weight: "
                                      "[5, 1, 3, 3] in the file, [4, 1, 3, 3] in the model)"),
    ]
    for extra, *messages in cases:
        assert cli.main(run + ["--resume", *extra]) == 2, extra
        err = _error(capsys)
        assert all(m in err for m in messages), err
        assert "checkpoint" not in err and "resume=True" not in err, err
        assert not os.path.exists("o.pt")
    assert cli.main(run + ["--resume"]) == 0


USER_MODELS = """
import torch
from torch import nn
from medic_fast.zoo import datasets, models


class Aux(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = models.DigitsCNN((4, 8, 8))

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.square().mean()


def cnn():
    return models.DigitsCNN((4, 8, 8))


def cnn64():
    return models.DigitsCNN((4, 8, 8)).double()


def clean():
    return torch.rand(64, 1, 8, 8), torch.randint(10, (64,))


def bytes8():
    return torch.randint(256, (64, 1, 8, 8), dtype=torch.uint8), torch.randint(10, (64,))


def one_class():
    return torch.rand(64, 1, 8, 8), torch.full((64,), 3)
"""


def test_models_and_data_that_sanitize_takes_or_refuses_in_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    """A model returning ``(logits, aux)`` is sanitized, with evaluation; 8-bit images, float32
    inputs to a float64 model, clean data of one class and --device cuda on a build without
    CUDA are one line each naming what was expected, before any training."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "models_.py").write_text(USER_MODELS)
    import models_

    torch.save(models_.Aux().state_dict(), "aux.pt")
    torch.save(models_.cnn().state_dict(), "cnn.pt")
    torch.save(models_.cnn64().state_dict(), "cnn64.pt")
    base = ["sanitize", "--epochs", "2", "--no-progress", "--out", "o.pt"]
    assert cli.main(base + ["--model", "models_:Aux", "--weights", "aux.pt", "--data",
                            "models_:clean", "--eval-data", "models_:clean"]) == 0
    assert "wrote o.pt (epoch 2: loss " in capsys.readouterr().out and os.path.exists("o.pt")
    os.remove("o.pt")
    cnn = ["--model", "models_:cnn", "--weights", "cnn.pt"]
    cases = [
        (cnn + ["--data", "models_:bytes8"], "data: inputs are torch.uint8, but the model "
         "computes in torch.float32; give floating-point inputs (X.to(torch.float32), divided "
         "by 255 for 8-bit images)"),
        (["--model", "models_:cnn64", "--weights", "cnn64.pt", "--data", "models_:clean"],
         "data: inputs are torch.float32, but the model computes in torch.float64; give inputs "
         "of the model's dtype (X.to(torch.float64)), or convert the model "
         "(model.to(torch.float32))"),
        (cnn + ["--data", "models_:clean", "--eval-data", "models_:bytes8"],
         "eval_data: inputs are torch.uint8, but the model computes in torch.float32"),
        (cnn + ["--data", "models_:one_class"], "data: every label is 3; clean data must hold "
         "at least two classes"),
    ]
    if not torch.cuda.is_available():
        cases.append((cnn + ["--data", "models_:clean", "--device", "cuda"],
                      "--device 'cuda': this PyTorch cannot use CUDA (a CPU-only build); use "
                      "'cpu'"))
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        assert message in _error(capsys), extra
        assert not os.path.exists("o.pt")


def test_help_shows_one_default_per_option_the_demo_attack_and_the_scan_report(capsys):
    """Each option's help gives its default once (not "(default 20.0) (default: None)"); the
    demo's help names the attack it runs; scan's help explains the report's fields, such as
    pocket_sources against n_found."""
    from medic_fast.zoo.demo import ATTACKS, DEMO_SETTINGS

    _, subs = _subparsers()
    for name, sub in subs.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            own, _, appended = fmt._expand_help(action).partition(" (default: ")
            assert not (appended and re.search(r"\bdefault\b", own)) and appended != "None)", \
                (name, action.option_strings, own, appended)
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "(default: None)" not in capsys.readouterr().out
    attack = type(ATTACKS[DEMO_SETTINGS["attack"]](0)).__name__
    assert subs["demo"].description.startswith(f"Train a {attack}-trojaned CNN")
    epilog = " ".join(subs["scan"].epilog.split())
    assert "n_found (searches that reached a point classified as their target)" in epilog
    assert "hull: only the points deeper than --threshold, so at most n_found" in epilog


def test_progress_is_a_line_per_epoch_on_a_log_and_says_why_epochs_are_stretched(user_files,
                                                                                 tmp_path):
    """stderr not a terminal (a pipe): one line per epoch, not a bar redrawn at every step;
    first, once, the layers cloned by default and why the run has more epochs than the recipe's
    60."""
    args = [a for a in user_files if a != "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "medic_fast.cli", "sanitize", *args, "--out",
                        "o.pt", "--min-steps", "150", "--batch-size", "32"], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    layers, first, *lines = r.stderr.splitlines()
    assert layers.startswith("medic: cloning every conv and BatchNorm output, 6 layers: ")
    assert first == ("medic: 75 epochs of 2 steps: the recipe's 60 epochs stretched to "
                     "min_steps=150 optimizer steps, as a small clean set needs (give epochs "
                     "alone for exactly that many)")
    assert [line.split(",")[0] for line in lines] == [f"medic: epoch {e}/75" for e in range(1, 76)]
    assert "\r" not in r.stderr and len(r.stderr) < 80 * 77
    assert "wrote o.pt (epoch 75: loss" in r.stdout


def test_demo_progress_is_labelled_by_phase(capsys):
    """Each of the demo's phases shows progress labelled by the phase's name (the trojan's
    training is not "scratch", plain cloning is not "medic"), the cloning phases first the
    layers they clone."""
    from medic_fast.zoo.demo import run_demo

    run_demo(0, progress=True, settings=dict(trojan_epochs=1, epochs=1, min_steps=0))
    phases = {}
    for line in capsys.readouterr().err.splitlines():
        if line.startswith("["):
            phase = phases.setdefault(line.split("] ", 1)[1], [])
        else:
            phase.append(line)
    cloned = ["cloning every conv and BatchNorm output"]
    assert {name: [line.split(",")[0] for line in lines] for name, lines in phases.items()} == {
        name: [f"{name}: {line}" for line in (cloned if name in ("medic", "plain cloning")
                                              else []) + ["epoch 1/1"]]
        for name in ("trojaned", "medic", "plain cloning", "finetune", "scratch")}
