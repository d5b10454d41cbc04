"""The Cloner, collect_stats and CloneTrainer on a tiny GPT-2 (from a config, no downloads) sharded
over 2 CPU processes with gloo: DDP, FSDP2 (``fully_shard``) and FSDP1 give the gradients of the
unsharded model averaged over the ranks' halves of the batch, collect_stats under the process
group gives the statistics of all the data, and a 2-process CloneTrainer under torchrun ends
with identical parameters on both ranks.

One spawn of 2 processes runs every sharded step (starting processes that import transformers
is most of the cost); each engine's outcome, or its error, is saved per engine, so an engine
this torch cannot run on CPU skips with the error it raised."""
import os
import socket
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install medic-fast[hf])")

from medic_fast.medic.cloner import Cloner  # noqa: E402
from medic_fast.stats import LayerStats, collect_stats  # noqa: E402
from shared import TINY_VOCAB, tiny_gpt2  # noqa: E402

V, T, B = TINY_VOCAB, 8, 4  # B: the full batch; rank r gets rows [r * B // 2, (r + 1) * B // 2)
WORLD = 2
LAYERS = ["transformer.h.0", "transformer.h.1"]
ENGINES = ("ddp", "fsdp2", "fsdp1")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for shared.py
TIMEOUT = 240  # seconds: a hang fails the test instead of blocking CI
WRAPPER_SEGMENTS = {"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _batch(seed, n=B):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=gen)
    am = torch.ones(n, T, dtype=torch.long)
    am[0, 5:] = 0
    am[n - 1, 3:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}


def _half(batch, rank):
    n = len(batch["input_ids"]) // WORLD
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


STATS_DATA = [_batch(10 + i) for i in range(4)]  # 4 dict batches: 2 per rank


def _plain(name):
    return ".".join(s for s in name.split(".") if s not in WRAPPER_SEGMENTS)


def _numpy_stats(stats):
    # numpy arrays pickle by value (tensors would pass file descriptors that die with us)
    return {"layers": list(stats.layers), "per": stats.per, "count": stats.count,
            "mean": [m.numpy() for m in stats.mean], "std": [s.numpy() for s in stats.std]}


def _from_numpy(d):
    return LayerStats(d["layers"], [torch.from_numpy(m) for m in d["mean"]],
                      [torch.from_numpy(s) for s in d["std"]], d["per"], d["count"])


# --------------------------------------------------------------------------------------------
# the 2 processes
# --------------------------------------------------------------------------------------------

def _step(engine, teacher, stats, rank):
    """One Cloner step (backward, no optimizer) of a student sharded by ``engine`` on this rank's
    half of the batch: ``{plain parameter name: full gradient}`` (numpy)."""
    student = tiny_gpt2(1)
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(student)
    elif engine == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in student.transformer.h:
            fully_shard(block, mesh=mesh)
        model = fully_shard(student, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        model = FSDP(student, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                     device_id=torch.device("cpu"), use_orig_params=True)
    Cloner(teacher, model, LAYERS, stats)(_half(_batch(0), rank)).backward()
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, with_grads=True):
            return {_plain(n): p.grad.detach().clone().numpy()
                    for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: DTensor shards
            g = g.full_tensor()
        grads[_plain(n)] = g.detach().clone().numpy()
    return grads


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        teacher = tiny_gpt2(0).eval().requires_grad_(False)
        stats = collect_stats(teacher, STATS_DATA, LAYERS)  # each rank: half of the batches
        results["stats"] = _numpy_stats(stats)
        for engine in ENGINES:
            try:
                results[engine] = _step(engine, teacher, stats, rank)
            except Exception as e:  # an engine this torch cannot run on CPU: its reason
                results[engine] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Both ranks' results: ``{"stats": ..., engine: grads or error text}`` per rank."""
    tmp = tmp_path_factory.mktemp("sharded")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "rendezvous"), str(tmp)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT} s (a collective hung)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(stats):
    """The unsharded student's gradients of the mean of the two halves' losses, as DDP
    averages them."""
    teacher = tiny_gpt2(0).eval().requires_grad_(False)
    student = tiny_gpt2(1)
    cloner = Cloner(teacher, student, LAYERS, stats)
    loss = sum(cloner(_half(_batch(0), r)) for r in range(WORLD)) / WORLD
    names = [n for n, _ in student.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(student.parameters()))))


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_gradients_equal_unsharded(sharded, engine):
    got = [r[engine] for r in sharded]
    if isinstance(got[0], str) or isinstance(got[1], str):
        reason = next(g for g in got if isinstance(g, str))
        if engine == "ddp":
            pytest.fail(reason)
        pytest.skip(f"{engine} does not run on CPU with gloo in torch {torch.__version__}: "
                    f"{reason.splitlines()[0]}")
    ref = _reference(_from_numpy(sharded[0]["stats"]))
    for grads in got:
        assert set(grads) == set(ref)
        for name, r in ref.items():
            g = torch.from_numpy(grads[name])
            assert g.shape == r.shape, name
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), \
                (name, float((g - r).abs().max()))


def test_collect_stats_under_process_group(sharded):
    """Each rank reads half of the batches; both end with the statistics of all of them, equal to
    the single-process ones to fp32 rounding (the float64 merge order differs)."""
    single = collect_stats(tiny_gpt2(0).eval(), STATS_DATA, LAYERS)
    for r in sharded:
        st = _from_numpy(r["stats"])
        assert st.layers == single.layers and st.count == single.count == 4 * B
        for a, b in zip(st.mean + st.std, single.mean + single.std):
            torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


# --------------------------------------------------------------------------------------------
# CloneTrainer under torchrun
# --------------------------------------------------------------------------------------------

TRAINER_SCRIPT = '''
import os, sys
import torch
import transformers
from medic_fast.integrations.hf import CloneTrainer
from medic_fast.stats import collect_stats
from shared import TINY_VOCAB as V, tiny_gpt2 as gpt2

torch.set_num_threads(1)
T = 8
LAYERS = ["transformer.h.0", "transformer.h.1"]


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


out = sys.argv[1]
args = transformers.TrainingArguments(
    output_dir=out, use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no",
    logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3)
teacher = gpt2(0)
stats = collect_stats(teacher, [{k: torch.stack([Rows(8, 1)[i][k] for i in range(j, j + 4)])
                                  for k in ("input_ids", "attention_mask", "labels")}
                                 for j in (0, 4)], LAYERS)
student = gpt2(1)
before = {k: v.clone() for k, v in student.state_dict().items()}
trainer = CloneTrainer(model=student, args=args, train_dataset=Rows(16, 0), teacher=teacher,
                       stats=stats, layers=LAYERS, tau=5.0, lam=10.0)
trainer.train()
import torch.distributed as dist
assert dist.is_initialized() and dist.get_world_size() == 2, "not 2 processes"
assert isinstance(trainer.cloner.student, torch.nn.parallel.DistributedDataParallel)
state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
assert any(not torch.equal(state[k], before[k]) for k in state), "no parameter changed"
torch.save(state, os.path.join(out, f"state{dist.get_rank()}.pt"))
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clone_trainer_two_processes_torchrun(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed "
                        "(pip install medic-fast[hf])")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAINER_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), TESTS,
                                                      os.environ.get("PYTHONPATH")] if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s: {e.stderr}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt") for r in range(2))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
