"""`medic-fast scan`: --k, --restarts, --cut, --threads, --json, --plot, progress, --backend per
method and the exit status per verdict, end to end on a tiny model and data given as
PKG.MODULE:FACTORY (a user module in the cwd)."""
import json
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import medic_fast
from medic_fast import cli
from medic_fast.zoo import models

PNG = b"\x89PNG\r\n\x1a\n"

# Three classes on 2-D points, labelled by the model itself so that every sample is correctly
# classified and every class with at least --k samples is searched.
USER_MODULE = """
import torch
from medic_fast.zoo import models

def model():
    return models.MLP(2, 3, (16, 16))

def data():
    g = torch.Generator().manual_seed(0)
    X = 10 * torch.randn(150, 2, generator=g)
    m = model()
    m.load_state_dict(torch.load("in.pt", weights_only=True))
    with torch.no_grad():
        return X, m(X).argmax(1)
"""


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """usermod.py and in.pt in the cwd; the scan arguments for them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermod.py").write_text(textwrap.dedent(USER_MODULE))
    torch.manual_seed(1)  # with these weights the data has 54, 42 and 54 samples per class
    torch.save(models.MLP(2, 3, (16, 16)).state_dict(), tmp_path / "in.pt")
    yield ["scan", "--model", "usermod:model", "--weights", "in.pt", "--data", "usermod:data",
           "--backend", "reference", "--threads", "1"]
    sys.modules.pop("usermod", None)  # the next test's usermod is another file


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the command started scanning before rejecting its arguments")
    monkeypatch.setattr(medic_fast, "scan", fail)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("medic-fast: error: ") and err.count("\n") == 1, err
    return err


def test_scan_writes_json_and_plot_and_shows_progress(user_files, tmp_path, monkeypatch,
                                                      capsys):
    pytest.importorskip("matplotlib")
    args = user_files + ["--method", "paper", "--k", "3", "--restarts", "2", "--cut", "layers.2",
                         "--json", "r.json", "--plot", "p.png"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "scan: features" in err  # progress is on by default: the bar, then the search's size
    assert "scan: 12 searches = 6 class pairs x 2 restarts" in err
    assert out.startswith("wrote r.json (ScanReport(") and "wrote p.png\n" in out
    text = (tmp_path / "r.json").read_text()
    report = json.loads(text)
    assert text.startswith('{\n  "verdict": "clean",\n  "flagged": false,')  # indented
    assert report["cut"] == "layers.2" and report["n_searches"] == 12
    assert report["settings"]["k"] == 3 and report["settings"]["restarts"] == 2
    assert len(report["P"]) == 3 and report["P"][1][1] is None
    png = (tmp_path / "p.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5000
    # never overwritten: refused before any work, the files as they were
    _no_work(monkeypatch)
    assert cli.main(args) == 2
    assert "--json 'r.json': exists and is never overwritten; choose another path" in \
        _error(capsys)
    assert cli.main(args[:-4] + ["--json", "r2.json", "--plot", "p.png"]) == 2
    assert "--plot 'p.png': exists and is never overwritten" in _error(capsys)
    assert cli.main(args[:-4] + ["--json", "same.png", "--plot", "./same.png"]) == 2
    assert "is the same file as --json" in _error(capsys)
    assert (tmp_path / "r.json").read_text() == text and (tmp_path / "p.png").read_bytes() == png
    assert not (tmp_path / "r2.json").exists()


def test_without_json_the_report_goes_to_stdout(user_files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(user_files + ["--method", "paper", "--restarts", "1", "--no-progress",
                                  "--plot", "p.svg"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout holds the JSON alone
    assert report["settings"]["restarts"] == 1 and report["settings"]["k"] == 5  # scan's default
    assert err == "wrote p.svg\n"  # --no-progress: nothing else
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_options_reach_scan(user_files, monkeypatch, capsys):
    seen = []

    def scan(model, data, **kwargs):
        seen.append(kwargs)
        return SimpleNamespace(verdict="clean", to_json=lambda: "{}")
    monkeypatch.setattr(medic_fast, "scan", scan)
    assert cli.main(user_files + ["--k", "4", "--n", "7", "--restarts", "3", "--cut", "layers.0",
                                  "--method", "paper", "--threshold", "0.3",
                                  "--max-memory", "0.5"]) == 0
    assert cli.main(user_files[:-2] + ["--no-progress"]) == 0
    given, plain = seen
    assert (given["k"], given["n"], given["restarts"], given["cut"]) == (4, 7, 3, "layers.0")
    assert (given["method"], given["threshold"]) == ("paper", 0.3)
    assert given["max_memory"] == 2 ** 29
    assert given["threads"] == 1 and given["progress"] is True
    assert not {"k", "n", "restarts", "cut", "threshold", "max_memory"} & set(plain)
    assert plain["method"] == "hull"
    assert plain["threads"] is None and plain["progress"] is False
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(user_files + ["--k", "1"])
    assert "--k: must be an integer >= 2, got 1" in capsys.readouterr().err


def test_plot_type_is_checked_before_any_work(user_files, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    _no_work(monkeypatch)
    assert cli.main(user_files + ["--plot", "p.xyz"]) == 2
    assert "--plot 'p.xyz': unknown image type 'xyz'; end the name with one of " in _error(capsys)
    assert cli.main(user_files + ["--plot", "plot"]) == 2
    assert "--plot 'plot': no file type; end the name with one of " in _error(capsys)


def test_plot_without_matplotlib_is_refused_before_any_work(user_files, tmp_path, monkeypatch,
                                                            capsys):
    _no_work(monkeypatch)
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(user_files + ["--plot", "p.png", "--json", "r.json"]) == 2
    err = _error(capsys)
    assert err.startswith("medic-fast: error: --plot 'p.png': plotting needs matplotlib")
    assert 'pip install "medic_fast[plot]"' in err
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "r.json").exists()


def test_scan_help_says_what_clear_detects(capsys):
    with pytest.raises(SystemExit):
        cli.main(["scan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Detects sample-targeted backdoors (one attacked sample sent to a target class), not " \
        "trigger backdoors such as BadNets: for those use MEDIC (medic-fast sanitize)" in text
    assert "Exit status: 0 clean, 1 flagged, 3 inconclusive" in text
    for flag in ("--method", "--k", "--restarts", "--cut", "--threads", "--json", "--plot",
                 "--no-progress"):
        assert flag in text


def _report(out) -> dict:
    """The JSON report printed on stdout, and stdout holds nothing else."""
    return json.loads(out)


@pytest.mark.parametrize("extra, status, verdict", [
    ([], 0, "clean"),  # the model labelled the data: every class searched, nothing deep
    (["--threshold", "0"], 1, "flagged"),  # any point found in another class flags it
    (["--k", "100"], 3, "inconclusive"),  # no class has 100 correctly classified samples
])
def test_exit_status_says_the_verdict(user_files, capsys, extra, status, verdict):
    assert cli.main(user_files + ["--no-progress"] + extra) == status
    out, err = capsys.readouterr()
    report = _report(out)
    assert report["verdict"] == verdict and report["flagged"] is (verdict == "flagged")
    if verdict == "inconclusive":
        assert report["searched"] == [] and report["n_searches"] == 0
        assert err == f"medic-fast: scan inconclusive: {report['advice']}\n"
        assert err.endswith(f", or lower k to {min(report['skipped'].values())}\n")
    else:
        assert report["searched"] == [0, 1, 2] and report["n_searches"] > 0 and err == ""


def test_a_class_missing_from_the_data_is_inconclusive(user_files, tmp_path, capsys):
    (tmp_path / "onlyzero.py").write_text(textwrap.dedent("""
        import usermod

        def data():
            X, y = usermod.data()
            return X[y == 0], y[y == 0]
    """))
    assert cli.main(user_files + ["--data", "onlyzero:data", "--no-progress"]) == 3
    report = _report(capsys.readouterr().out)
    assert report["verdict"] == "inconclusive" and report["skipped"] == {"1": 0, "2": 0}
    assert report["skip_reasons"]["1"] == "the data has no sample of this class"
    sys.modules.pop("onlyzero", None)


def test_backend_is_obeyed_or_refused_for_each_method(user_files, monkeypatch, capsys):
    assert cli.main(user_files + ["--method", "paper", "--restarts", "1", "--no-progress"]) == 0
    assert _report(capsys.readouterr().out)["backend"] == "reference"  # user_files ask for it
    _no_work(monkeypatch)
    for backend in ("cpp", "cuda"):  # the extension's kernels: --method paper only
        assert cli.main(user_files + ["--backend", backend]) == 2
        assert f"--backend '{backend}': --method hull runs its search in plain PyTorch and " \
            "takes --backend auto or reference" in _error(capsys)
    assert cli.main(user_files + ["--method", "paper", "--backend", "cuda"]) == 2
    assert "--backend 'cuda': backend='cuda' runs pocket_search on CUDA tensors" in \
        _error(capsys)


def test_bounds_and_the_memory_limit_are_one_line_errors(user_files, capsys):
    assert cli.main(user_files + ["--k", "5000"]) == 2
    assert "k must be an int in [2, 1024], got 5000" in _error(capsys)
    assert cli.main(user_files + ["--method", "paper", "--restarts", "1000000",
                                  "--max-memory", "1", "--no-progress"]) == 2
    err = _error(capsys)
    assert "for 6,000,000 problems (k=5, n=50, restarts=1000000), above the limit of " \
        "1.00 GiB = 1,073,741,824 bytes, max_memory; lower restarts, n or k" in err
