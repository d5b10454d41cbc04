"""MEDIC on transformers (issue "Large models"): the demo, the step speed, the loss's memory.

1. demo: train a trojaned TinyTransformer on the synthetic sequence task (a token-pattern
   trigger), clone it with MEDIC through ``medic_fast.Cloner`` on a small clean set, fine-tune a
   copy on the same set for comparison; ACC / ASR before and after, wall-clock.
2. step: one training step (forward, backward, Adam) of a 6-layer d=512 transformer, batch 8,
   256 tokens, the 6 block outputs hooked: ``Cloner`` step vs a plain CE step of the student,
   interleaved, median per round (a busy machine slows both alike); peak extra RSS of each.
3. memory: the masked loss alone at activations [8, 1024, 4096] bf16: peak extra RSS as a
   multiple of acts_c, forward (with the kept gradient) and forward+backward.

    python benchmarks/bench_transformer.py [--parts demo,step,memory] [--rounds 3] [--repeats 5]
                                           [--json PATH] [--csv PATH]

Each part's rows (the demo's per model, the step's per round, the memory's per case) go to the
files, tagged with the part.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import medic_fast
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
    for f in (plain, ours, plain, ours):
        f()
    ratios, t_plain, t_ours = [], [], []
    for _ in range(args.rounds):
        tp, to = [], []
        for _ in range(args.repeats):
            for f, ts in ((plain, tp), (ours, to)):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        t_plain.append(statistics.median(tp))
        t_ours.append(statistics.median(to))
        ratios.append(t_ours[-1] / t_plain[-1])

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="demo,step,memory")
    p.add_argument("--epochs", type=int, default=15, help="training epochs of the trojaned model")
    p.add_argument("--clean", type=int, default=200, help="clean sequences for the defence")
    p.add_argument("--clone-epochs", type=int, default=30)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    add_output_options(p)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for part in args.parts.split(","):
        rows += [{"part": part, **r}
                 for r in {"demo": demo, "step": step, "memory": memory}[part](args)]
    write_rows(rows, "bench_transformer", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
