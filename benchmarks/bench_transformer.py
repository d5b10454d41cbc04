"""MEDIC on transformers (issue "Large models"): the demo, the step speed, the loss's memory, and
a Hugging Face GPT-2 step.

1. demo: train a trojaned TinyTransformer on the synthetic sequence task (a token-pattern
   trigger), clone it with MEDIC through ``medic_fast.Cloner`` on a small clean set, fine-tune a
   copy on the same set for comparison; ACC / ASR before and after, wall-clock.
2. step: one training step (forward, backward, Adam) of a 6-layer d=512 transformer, batch 8,
   256 tokens, the 6 block outputs hooked: ``Cloner`` step vs a plain CE step of the student,
   interleaved, median per round (a busy machine slows both alike); peak extra RSS of each.
3. memory: the masked loss alone at activations [8, 1024, 4096] bf16: peak extra RSS as a
   multiple of acts_c, forward (with the kept gradient) and forward+backward.
4. hf (issue 11, part 4; needs ``transformers``): a Hugging Face GPT-2 built from a config
   (default 6 layers, d=512, 8 heads, vocab 8192, batch 8 x 256 tokens, random tokens with
   right padding, ``attention_mask`` and ``labels``), teacher and student, every block hooked
   (``layers="blocks"``): ``Cloner`` step (``loss = cloner(batch); loss.backward();
   opt.step()``) vs the plain HF step (``student(**batch).loss.backward(); opt.step()``),
   interleaved as in 2, in four settings: fp32 and bf16 autocast, each without and with the
   student's non-reentrant gradient checkpointing. Median time, ratio (target <= 1.7x), peak
   extra memory of each (the resident set's high-water mark over one step) and the Cloner's
   overhead in units of the hooked activations (sum of B*T*H*bytes of the blocks' outputs);
   then the bytes allocated per phase of one step, from the profiler's allocation events
   (``medic_fast._memory``): the teacher's pass, the student's forward (at its start: what the
   teacher left), the clone loss, the backward, and the step's peak against the plain step's.

    python benchmarks/bench_transformer.py [--parts demo,step,memory,hf] [--rounds 3]
                                           [--repeats 5] [--json PATH] [--csv PATH]
    python benchmarks/bench_transformer.py --parts hf [--hf-layers 6] [--hf-embd 512]
                                           [--hf-heads 8] [--hf-vocab 8192] [--hf-batch 8]
                                           [--hf-seq 256] [--hf-settings fp32,fp32+ckpt,...]

The default ``--parts`` is demo,step,memory (hf is asked for by name). Each part's rows (the
demo's per model, the step's per round, the memory's per case, hf's per setting and round) go
to the files, tagged with the part.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import medic_fast
from medic_fast._memory import PHASES, allocated_by_phase
from medic_fast.data import make_loader
from medic_fast.medic.cloner import Cloner, masked_clone_loss
from medic_fast.train import fit
from medic_fast.zoo.transformer import TinyTransformer, TokenTrigger, make_sequences, padding_mask

from _harness import add_output_options, peak_extra_bytes, write_rows

MiB = 1 << 20


def _train(net, loss, X, y, *, epochs, lr, batch, seed):
    """Adam (weight decay 1e-4) + cosine over ``epochs`` on ``(X, y)``, with the package's one
    training loop; ``loss(x, y, mask)`` is the step's loss."""
    loader = make_loader((X, y), batch_size=batch, shuffle=True, seed=seed)
    fit(net, loader, lambda x, t: (loss(x, t, padding_mask(x)), {}), epochs=epochs, lr=lr,
        weight_decay=1e-4, seed=seed)


def demo(args):
    kw = dict(vocab=32, classes=4, d_model=64, depth=2, heads=4, max_len=32)
    X, y = make_sequences(4000, length=32, seed=0)
    Xte, yte = make_sequences(1000, length=32, seed=1)
    Xcl, ycl = make_sequences(args.clean, length=32, seed=2)  # the defender's clean set
    trigger, target = TokenTrigger(pattern=(29, 30, 31)), 0
    poisoned = trigger.poison(X, y, 0.1, target, seed=0)

    def report(name, model, seconds):
        r = medic_fast.evaluate(model, Xte, yte, trigger=trigger, target=target)
        print(f"  {name:26s} ACC {r['acc']:.3f}  ASR {r['asr']:.3f}  ({seconds:.1f} s)")
        return {"model": name, **r, "seconds": seconds}

    rows = []
    print(f"demo: 4000 training sequences (10% poisoned, trigger 29 30 31 -> class {target}), "
          f"{args.clean} clean sequences for the defence")
    torch.manual_seed(0)
    trojaned = TinyTransformer(**kw)
    t0 = time.perf_counter()
    _train(trojaned, lambda x, y, m: F.cross_entropy(trojaned(x), y), poisoned.X, poisoned.y,
           epochs=args.epochs, lr=2e-3, batch=64, seed=0)
    rows.append(report("trojaned", trojaned, time.perf_counter() - t0))

    teacher = copy.deepcopy(trojaned).eval().requires_grad_(False)
    layers = [f"blocks.{i}" for i in range(kw["depth"])] + \
             [f"blocks.{i}.self_attn" for i in range(kw["depth"])]
    t0 = time.perf_counter()
    stats = medic_fast.collect_stats(teacher, (Xcl, ycl), layers, mask_fn=padding_mask)
    torch.manual_seed(1)
    clone = TinyTransformer(**kw)
    cloner = Cloner(teacher, clone, layers, stats, tau=5.0, lam=args.lam)
    _train(clone, cloner, Xcl, ycl, epochs=args.clone_epochs, lr=2e-3, batch=32, seed=1)
    rows.append(report("MEDIC clone (Cloner)", clone, time.perf_counter() - t0))

    tuned = copy.deepcopy(trojaned)
    t0 = time.perf_counter()
    _train(tuned, lambda x, y, m: F.cross_entropy(tuned(x), y), Xcl, ycl,
           epochs=args.clone_epochs, lr=2e-4, batch=32, seed=1)
    rows.append(report("fine-tuned", tuned, time.perf_counter() - t0))

    torch.manual_seed(1)
    scratch = TinyTransformer(**kw)
    t0 = time.perf_counter()
    _train(scratch, lambda x, y, m: F.cross_entropy(scratch(x), y), Xcl, ycl,
           epochs=args.clone_epochs, lr=2e-3, batch=32, seed=1)
    rows.append(report("from scratch (CE only)", scratch, time.perf_counter() - t0))
    return rows


def _interleaved(plain, ours, rounds, repeats):
    """``(t_plain, t_ours, ratios)``: per round the median seconds of ``repeats`` calls of each
    step, the two interleaved call by call (a busy machine slows both alike), after two warm-up
    calls of each; ``ratios`` is ours / plain per round."""
    for f in (plain, ours, plain, ours):
        f()
    ratios, t_plain, t_ours = [], [], []
    for _ in range(rounds):
        tp, to = [], []
        for _ in range(repeats):
            for f, ts in ((plain, tp), (ours, to)):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        t_plain.append(statistics.median(tp))
        t_ours.append(statistics.median(to))
        ratios.append(t_ours[-1] / t_plain[-1])
    return t_plain, t_ours, ratios


def step(args):
    """Cloner step vs plain CE step of a 6-layer d=512 transformer, batch 8 x 256 tokens."""
    kw = dict(vocab=1000, classes=10, d_model=512, depth=6, heads=8, max_len=256)
    torch.manual_seed(0)
    teacher = TinyTransformer(**kw).eval().requires_grad_(False)
    student = TinyTransformer(**kw)
    layers = [f"blocks.{i}" for i in range(6)]
    gen = torch.Generator().manual_seed(0)

    def batch():
        X, y = make_sequences(8, length=256, min_length=192, vocab=1000, classes=10,
                              seed=int(torch.randint(1 << 30, (1,), generator=gen)))
        return X, y, padding_mask(X)

    stats = medic_fast.collect_stats(teacher, batch()[:2], layers, mask_fn=padding_mask)
    cloner = Cloner(teacher, student, layers, stats, tau=5.0, lam=10.0)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def run(loss_fn):
        def go():
            X, y, m = batch()
            loss = loss_fn(X, y, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return go

    plain = run(lambda X, y, m: F.cross_entropy(student(X), y))
    ours = run(cloner)
    t_plain, t_ours, ratios = _interleaved(plain, ours, args.rounds, args.repeats)

    def reset():
        return opt.zero_grad(set_to_none=True)
    mem_plain, mem_ours = peak_extra_bytes(plain, reset), peak_extra_bytes(ours, reset)
    print(f"step: 6 x d512 transformer, batch 8 x 256 tokens, 6 block outputs hooked, "
          f"{torch.get_num_threads()} threads")
    print(f"  plain CE step   {1e3 * statistics.median(t_plain):8.1f} ms   peak extra "
          f"{mem_plain / MiB:7.1f} MiB")
    print(f"  Cloner step     {1e3 * statistics.median(t_ours):8.1f} ms   peak extra "
          f"{mem_ours / MiB:7.1f} MiB")
    print(f"  ratio per round {', '.join(f'{r:.2f}' for r in ratios)}  (median "
          f"{statistics.median(ratios):.2f}x; target <= 1.9x)")
    return [{"round": i, "plain_ms": 1e3 * tp, "cloner_ms": 1e3 * to, "ratio": r,
             "plain_peak_mib": mem_plain / MiB, "cloner_peak_mib": mem_ours / MiB}
            for i, (tp, to, r) in enumerate(zip(t_plain, t_ours, ratios))]


def memory(args):
    """Peak extra RSS of the masked loss at [8, 1024, 4096] bf16, as a multiple of acts_c."""
    shape = (8, 1024, 4096)
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=gen, dtype=torch.bfloat16)
    c = (t + 0.3 * torch.randn(shape, generator=gen, dtype=torch.bfloat16)).requires_grad_()
    g = 1e-3 * torch.randn(shape, generator=gen, dtype=torch.bfloat16)
    mean, std = torch.zeros(shape[-1]), torch.rand(shape[-1], generator=gen) + 0.5
    mask = torch.rand(shape[:2], generator=gen) < 0.8
    size = c.numel() * c.element_size()

    def reset():
        c.grad = None

    def loss(masked):
        if masked:
            return masked_clone_loss(t, c, g, mean, std, mask, tau=5.0)
        return medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0, start_dim=2)

    def forward(masked):
        return lambda: loss(masked)

    def forward_backward(masked):
        def go():
            reset()
            loss(masked).backward()
        return go

    out = []
    print(f"memory: loss at {list(shape)} bf16, acts_c = {size / MiB:.0f} MiB, 20% padded tokens")
    for masked in (True, False):
        for name, fn in (("forward (keeps the gradient)", forward),
                         ("forward + backward", forward_backward)):
            label = f"{'masked' if masked else 'no mask'}, {name}"
            ratio = peak_extra_bytes(fn(masked), reset) / size
            out.append({"case": label, "peak_x_acts_c": ratio})
            print(f"  {label:40s} peak extra {ratio:.3f} x acts_c  (target <= 1.25)")
    return out


HF_SETTINGS = {"fp32": (False, False), "fp32+ckpt": (False, True),
               "bf16": (True, False), "bf16+ckpt": (True, True)}  # name -> (bf16 autocast, ckpt)


def _hf_batches(n, batch, seq, vocab, seed=0):
    """``n`` random GPT-2 batches: tokens, right padding to ``seq`` (real lengths uniform in
    [3/4 seq, seq]), ``attention_mask`` and ``labels`` (-100 at padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        lengths = torch.randint((3 * seq) // 4, seq + 1, (batch, 1), generator=gen)
        am = (torch.arange(seq) < lengths).long()
        out.append({"input_ids": ids, "attention_mask": am,
                    "labels": ids.masked_fill(am == 0, -100)})
    return out


def _output_bytes(model, layers, batch, ctx):
    """Bytes of each of ``layers``' outputs (the first tensor of a tuple) on ``batch``, under
    the autocast context ``ctx``, as the Cloner's hooks see them."""
    mods = dict(model.named_modules())
    sizes = {}

    def hook(name):
        def fn(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            sizes[name] = t.numel() * t.element_size()
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad(), ctx():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [sizes[n] for n in layers]


def _allocated(loss_fn, batch, ctx, reset, phases):
    """Bytes allocated per phase of one forward+backward on ``batch`` (the gradients of the
    step before freed first, the optimizer's step left out), after one warm-up."""
    def fwd_bwd():
        with ctx():
            loss = loss_fn(batch)
        with torch.profiler.record_function("backward"):
            loss.backward()

    fwd_bwd()
    reset()
    return allocated_by_phase(fwd_bwd, phases)


def _checkpointing(model, on):
    """The HF model's non-reentrant activation checkpointing on or off (``use_reentrant=False``:
    the Cloner refuses reentrant checkpointing). ``activation_checkpointing_*`` where
    transformers has it (>= 5.x; ``gradient_checkpointing_*`` is deprecated there), else
    ``gradient_checkpointing_*``."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    state = getattr(model, "is_activation_checkpointing", None)
    if (model.is_gradient_checkpointing if state is None else state) != on:
        raise RuntimeError(f"could not turn gradient checkpointing {'on' if on else 'off'}")


def hf(args):
    """Cloner step vs plain HF step of a GPT-2 from a config, fp32 / bf16 autocast, without /
    with non-reentrant gradient checkpointing of the student."""
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("--parts hf needs transformers (pip install medic-fast[hf])") from e
    settings = args.hf_settings.split(",")
    unknown = [s for s in settings if s not in HF_SETTINGS]
    if unknown:
        raise SystemExit(f"unknown --hf-settings {unknown}; of {list(HF_SETTINGS)}")
    L, H, heads, V = args.hf_layers, args.hf_embd, args.hf_heads, args.hf_vocab
    B, T = args.hf_batch, args.hf_seq

    def gpt2(seed):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=H, n_layer=L,
                                      n_head=heads, attn_pdrop=0.0, embd_pdrop=0.0,
                                      resid_pdrop=0.0, use_cache=False,
                                      bos_token_id=V - 1, eos_token_id=V - 1)
        return transformers.GPT2LMHeadModel(cfg)

    teacher = gpt2(0).eval().requires_grad_(False)
    student = gpt2(1).train()
    pool = _hf_batches(4, B, T, V)
    stats = medic_fast.collect_stats(teacher, pool[:2], "blocks")
    cloner = Cloner(teacher, student, "blocks", stats, tau=5.0, lam=10.0)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    print(f"hf: GPT-2 {L} layers, d={H}, {heads} heads, vocab {V}, batch {B} x {T} tokens "
          f"(3/4 to all real), {len(cloner.layers)} blocks hooked, "
          f"{torch.get_num_threads()} threads")

    def reset():
        return opt.zero_grad(set_to_none=True)

    rows, table = [], []
    for name in settings:
        bf16, ckpt = HF_SETTINGS[name]
        _checkpointing(student, ckpt)

        def ctx(bf16=bf16):
            return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else \
                contextlib.nullcontext()

        def run(loss_fn, ctx=ctx):
            it = iter(range(1 << 62))

            def go():
                b = pool[next(it) % len(pool)]
                reset()
                with ctx():
                    loss = loss_fn(b)
                loss.backward()
                opt.step()
            return go

        plain = run(lambda b: student(**b).loss)
        ours = run(cloner)
        if args.hf_memory_only:  # the allocated bytes per phase alone
            t_plain = t_ours = ratios = [float("nan")]
            mem_plain = mem_ours = float("nan")
        else:
            t_plain, t_ours, ratios = _interleaved(plain, ours, args.rounds, args.repeats)
            mem_plain, mem_ours = peak_extra_bytes(plain, reset), peak_extra_bytes(ours, reset)
        acts = _output_bytes(teacher, cloner.layers, pool[0], ctx)
        hooked = sum(acts)
        over = mem_ours - mem_plain
        tp, to = statistics.median(t_plain), statistics.median(t_ours)
        if args.hf_time_only:  # the step times alone (the profiler's pass takes minutes)
            alloc_plain = alloc_ours = {"step": {"start": 0, "peak": float("nan")}}
        else:
            alloc_plain = _allocated(lambda b: student(**b).loss, pool[0], ctx, reset,
                                     ("backward",))
            alloc_ours = _allocated(cloner, pool[0], ctx, reset, PHASES + ("backward",))
        phases = {k: v["peak"] / MiB for k, v in alloc_ours.items()}
        alloc_over = alloc_ours["step"]["peak"] - alloc_plain["step"]["peak"]
        table.append((name, tp, to, ratios, mem_plain, mem_ours, over, hooked, alloc_plain,
                      alloc_ours, alloc_over))
        common = {"setting": name, "layers": L, "embd": H, "heads": heads, "vocab": V,
                  "batch": B, "seq": T, "plain_peak_mib": mem_plain / MiB,
                  "cloner_peak_mib": mem_ours / MiB, "overhead_mib": over / MiB,
                  "hooked_acts_mib": hooked / MiB, "overhead_x_hooked": over / hooked,
                  "alloc_plain_peak_mib": alloc_plain["step"]["peak"] / MiB,
                  "alloc_cloner_peak_mib": alloc_ours["step"]["peak"] / MiB,
                  "alloc_overhead_x_hooked": alloc_over / hooked,
                  "teacher_peak_mib": phases.get(PHASES[0], float("nan")),
                  "student_start_mib": alloc_ours.get(PHASES[1], {}).get("start", 0) / MiB,
                  "student_peak_mib": phases.get(PHASES[1], float("nan")),
                  "loss_peak_mib": phases.get(PHASES[2], float("nan")),
                  "backward_peak_mib": phases.get("backward", float("nan"))}
        rows += [{**common, "round": i, "plain_ms": 1e3 * a, "cloner_ms": 1e3 * b, "ratio": r}
                 for i, (a, b, r) in enumerate(zip(t_plain, t_ours, ratios))]

    print("\n| setting | plain step | Cloner step | ratio (per round) | plain peak extra | "
          "Cloner peak extra | overhead | hooked acts | overhead / hooked |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, tp, to, ratios, mp, mo, over, hooked, *_ in table:
        per = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"| {name} | {1e3 * tp:.0f} ms | {1e3 * to:.0f} ms | "
              f"**{statistics.median(ratios):.2f}x** ({per}) | {mp / MiB:.1f} MiB | "
              f"{mo / MiB:.1f} MiB | {over / MiB:+.1f} MiB | {hooked / MiB:.1f} MiB | "
              f"{over / hooked:.2f} |")
    print("\nratio = Cloner / plain, median over rounds; overhead = Cloner peak - plain peak "
          "(RSS high-water mark over one step), in units of the teacher's outputs at the hooked "
          "blocks (sum of B*T*H*bytes)\n")
    print("Allocated per phase of one step (MiB above the step's start; the profiler's "
          "allocation events):\n")
    print("| setting | plain step peak | teacher pass peak | student fwd: start / peak | loss "
          "peak | backward peak | Cloner step peak | overhead / hooked |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, *_, hooked, ap, ao, aover in table:
        def mib(key, field="peak", ao=ao):
            return ao.get(key, {}).get(field, float("nan")) / MiB
        print(f"| {name} | {ap['step']['peak'] / MiB:.1f} | {mib(PHASES[0]):.1f} | "
              f"{mib(PHASES[1], 'start'):.1f} / {mib(PHASES[1]):.1f} | {mib(PHASES[2]):.1f} | "
              f"{mib('backward'):.1f} | {ao['step']['peak'] / MiB:.1f} | "
              f"**{aover / hooked:.2f}** |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="demo,step,memory")
    p.add_argument("--epochs", type=int, default=15, help="training epochs of the trojaned model")
    p.add_argument("--clean", type=int, default=200, help="clean sequences for the defence")
    p.add_argument("--clone-epochs", type=int, default=30)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    g = p.add_argument_group("hf part (GPT-2 from a config)")
    g.add_argument("--hf-layers", type=int, default=6)
    g.add_argument("--hf-embd", type=int, default=512)
    g.add_argument("--hf-heads", type=int, default=8)
    g.add_argument("--hf-vocab", type=int, default=8192)
    g.add_argument("--hf-batch", type=int, default=8)
    g.add_argument("--hf-seq", type=int, default=256)
    g.add_argument("--hf-settings", default=",".join(HF_SETTINGS),
                   help=f"comma-separated, of {', '.join(HF_SETTINGS)}")
    g.add_argument("--hf-memory-only", action="store_true",
                   help="only the bytes allocated per phase (no timing, no resident-set peaks)")
    g.add_argument("--hf-time-only", action="store_true",
                   help="only the step times and resident-set peaks (no allocation profile)")
    add_output_options(p)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for part in args.parts.split(","):
        rows += [{"part": part, **r}
                 for r in {"demo": demo, "step": step, "memory": memory, "hf": hf}[part](args)]
    write_rows(rows, "bench_transformer", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
