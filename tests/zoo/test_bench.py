"""The step benchmark (medic_fast.zoo.bench) and the benchmark scripts' shared harness."""
import ast
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import medic_fast
from medic_fast._utils import torch_threads
from medic_fast.zoo.bench import bench_steps

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("_harness", BENCHMARKS / "_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_steps_times_the_cloner_users_get(monkeypatch, capsys):
    made = []

    class Spy(medic_fast.Cloner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(kwargs)

    monkeypatch.setattr(medic_fast, "Cloner", Spy)
    r = bench_steps(batch=2, size=8, repeats=2, warmup=1, backend="reference", progress=True)
    assert made[0] == {"tau": 5.0, "lam": 10.0, "backend": "reference"}
    assert made[1]["cache"].hits == 2 and made[1]["cache"].misses == 1  # warm-up fills it
    assert set(r["seconds"]) == {"plain", "ours", "cached", "released"}
    assert all(v > 0 for v in r["seconds"].values())
    assert r["hooked"] == 25 and (r["batch"], r["size"], r["repeats"]) == (2, 8, 2)
    assert r["ours_vs_plain"] == pytest.approx(r["seconds"]["ours"] / r["seconds"]["plain"])
    assert capsys.readouterr().err.count("bench: round") == 3


def test_median_ms_warms_up_then_takes_the_median(harness):
    calls = []
    assert harness.median_ms(lambda: calls.append(1), repeat=5, warmup=2) >= 0
    assert len(calls) == 7


def test_write_rows_json_and_csv(harness, tmp_path):
    rows = [{"case": "a", "ms": 1.5}, {"case": "b", "note": "x", "threads": 1}]
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    harness.write_rows(rows, "bench_x", json_path=str(js), csv_path=str(cs))
    written = json.loads(js.read_text())
    assert [r["case"] for r in written] == ["a", "b"]
    assert written[0]["benchmark"] == "bench_x" and written[0]["torch"]
    assert written[1]["threads"] == 1  # a row's own value wins over the run's
    with open(cs, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case", "ms", "note", "threads", "benchmark", "torch",
                              "medic_fast", "timestamp"]
    assert table[0]["note"] == "" and table[1]["note"] == "x" and table[1]["threads"] == "1"
    assert [r["timestamp"] for r in table] == [r["timestamp"] for r in written]


def test_write_rows_writes_nothing_without_paths(harness, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    harness.write_rows([{"a": 1}], "bench_x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_scripts_share_only_the_harness(script):
    """A benchmark script imports from ``_harness`` only, never from another script."""
    local = {p.stem for p in BENCHMARKS.glob("*.py")}
    tree = ast.parse((BENCHMARKS / script).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names & local == {"_harness"}


def test_paper_scale_projects_the_whole_run(monkeypatch, capsys):
    """The projection is the median step times the run's steps (ceil(inputs / batch) x
    epochs), plus the timed statistics pass for ours; the CLI prints it and restores threads."""
    from medic_fast import cli
    from medic_fast.zoo import bench

    monkeypatch.setitem(bench.PAPER_SCALE, "inputs", 5)
    monkeypatch.setitem(bench.PAPER_SCALE, "batch", 2)
    monkeypatch.setitem(bench.PAPER_SCALE, "size", 8)
    monkeypatch.setitem(bench.PAPER_SCALE, "epochs", 4)
    r = bench.paper_scale(repeats=1, warmup=0, backend="reference")
    p = r["paper_scale"]
    assert p["steps"] == 12 and p["stats_seconds"] > 0
    assert p["projected_seconds"]["plain"] == pytest.approx(12 * r["seconds"]["plain"])
    assert p["projected_seconds"]["ours"] == pytest.approx(12 * r["seconds"]["ours"]
                                                          + p["stats_seconds"])
    assert p["projected_seconds"]["cached"] == pytest.approx(
        3 * r["seconds"]["ours"] + 9 * r["seconds"]["cached"] + p["stats_seconds"])
    assert p["cache_bytes"] == 2 * 5 * 4 * sum(  # acts and grads, float32, 5 inputs
        a[0].numel() for a in _wrn_acts(8))
    assert p["ours_vs_plain"] == pytest.approx(p["projected_seconds"]["ours"]
                                               / p["projected_seconds"]["plain"])
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--paper-scale", "--repeats", "1", "--warmup", "0",
                     "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "the paper's run: 5 inputs, batch 2, 4 epochs = 12 steps" in out
    assert "released / ours" in out and "statistics pass" in err
    assert torch.get_num_threads() == threads


def _wrn_acts(size):
    from medic_fast.capture import ActivationCapture
    from medic_fast.zoo import models

    m = models.wrn16_1().eval()
    with torch.no_grad(), ActivationCapture(m, models.wrn_released_layers(m)) as cap:
        m(torch.rand(1, 3, size, size))
        return cap.outputs()


@pytest.fixture
def defences_script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_defences",
                                                  BENCHMARKS / "bench_defences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_defences_job_table_and_plot(defences_script, tmp_path):
    """One tiny job: the trojan row, then a row per defence and fraction, with the budget all
    fresh-network defences share; the table's cells are seed means; the plot keeps only the
    cases where the attack took."""
    rows = defences_script.run_job(("cnn", "badnets", 0, [0.02], ["medic", "medic[tau=0]",
                                                                  "scratch"], 2))
    assert [r["defence"] for r in rows] == ["trojan", "medic", "medic[tau=0]", "scratch"]
    assert rows[1]["clean"] == round(0.02 * 1258) and rows[1]["fraction"] == 0.02
    assert all(0 <= r["acc"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    assert rows[0]["asr"] > 0.9  # 2 epochs are enough for BadNets to take
    assert defences_script._options("tau=20;min_steps=500") == {"tau": 20.0, "min_steps": 500}
    fake = [dict(r, seed=1, acc=0.5, asr=0.0) for r in rows]
    text = defences_script.table(rows + fake, ["medic", "scratch"])
    mean = 100 * (rows[1]["acc"] + 0.5) / 2
    assert "| badnets | " in text and f"{mean:.1f} / " in text
    taken = defences_script.took(rows + fake)  # seed 1's fake trojan has ASR 0: left out
    assert {r["seed"] for r in taken} == {0}
    path = tmp_path / "d.png"
    defences_script.plot(rows + [dict(r, seed=2) for r in rows], ["medic", "scratch"], path)
    assert path.stat().st_size > 0


def test_bench_clear_unit_rows_table_and_figures(monkeypatch, tmp_path, capsys):
    """One seed of the Swiss roll's transfer form, label flip only: a clean row and an attack
    row with both methods' verdicts, patch against clean-only fine-tuning, the table, the JSON
    and the pictures."""
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_clear", BENCHMARKS / "bench_clear.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "ATTACKS", ("label_flip",))
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["bench_clear.py", "--seeds", "1", "--first-seed", "104",
                                     "--tasks", "swiss_roll", "--forms", "transfer",
                                     "--figures", str(tmp_path), "--json", str(out)])
    with torch_threads(1):
        script.main()
    text = capsys.readouterr().out
    assert "| swiss_roll | transfer | label_flip | 1/1 | 1/1 | 0/1 |" in text
    rows = json.loads(out.read_text())
    attack = [r for r in rows if r.get("attack") == "label_flip" and "seed" in r]
    assert attack[0]["took"] and attack[0]["hull_detected"] and not attack[0]["asr_patch"]
    for name in ("hull_heatmap", "paper_heatmap", "regions"):
        assert (tmp_path / f"clear_swiss_roll_label_flip_transfer_{name}.png").stat().st_size > 0
    from medic_fast.zoo.tasks import make_task
    with torch_threads(1):
        g = script.pocket_geometry(make_task("swiss_roll", seed=104, epochs=5))
    assert set(g) == {"d_nn", "gap", "reach", "depth"} and g["d_nn"] > 0 and g["depth"] > 0
    assert g["gap"] >= 0 and 0 <= g["reach"] <= 1
