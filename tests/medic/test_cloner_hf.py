"""The Cloner and collect_stats on Hugging Face models and dict batches (tiny GPT-2 and Llama built
from configs, no downloads): a plain loop, the model's own loss, padding masks, layer resolution
("blocks", globs, wrappers), and the float64 reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install medic-fast[hf])")

from medic_fast.capture import ActivationCapture, find_layers, resolve_layers  # noqa: E402
from medic_fast.medic.cloner import Cloner  # noqa: E402
from medic_fast.stats import collect_stats  # noqa: E402
from shared import TINY_VOCAB, float64_clone_rows, tiny_gpt2, tiny_llama  # noqa: E402

V, T, B = TINY_VOCAB, 8, 3


MODELS = {"gpt2": (tiny_gpt2, "transformer.h"), "llama": (tiny_llama, "model.layers")}


def _pair(kind):
    make, blocks = MODELS[kind]
    teacher = make(0).eval().requires_grad_(False)
    return teacher, make(1), [f"{blocks}.0", f"{blocks}.1"]


def _batch(seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    am = torch.ones(B, T, dtype=torch.long)
    if pad:
        am[0, 5:] = 0
        am[2, 3:] = 0
    labels = ids.masked_fill(am == 0, -100)
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _stats(teacher, layers):
    return collect_stats(teacher, [_batch(1), _batch(2)], layers)


@pytest.mark.parametrize("kind", list(MODELS))
def test_plain_loop_with_dict_batches(kind):
    teacher, student, layers = _pair(kind)
    cloner = Cloner(teacher, student, layers, _stats(teacher, layers))
    state = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    before = copy.deepcopy(student.state_dict())
    for step in range(2):
        batch = _batch(step)
        loss = cloner(batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        opt.step()
    assert cloner.last.student_output is None  # not kept by default: its logits would live on
    cloner.keep_output = True
    cloner(_batch())
    out = cloner.last.student_output
    assert isinstance(out, transformers.utils.ModelOutput) and out.logits.shape == (B, T, V)
    assert torch.isfinite(cloner.last.clone) and cloner.last.clone > 0
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("kind", list(MODELS))
def test_ce_is_the_models_own_loss(kind):
    teacher, student, layers = _pair(kind)
    batch = _batch()
    cloner = Cloner(teacher, student, layers, _stats(teacher, layers))
    cloner(batch)
    with torch.no_grad():
        own = student(**batch).loss
    torch.testing.assert_close(cloner.last.ce, own)
    # without .loss (no labels to the model): CE on the logits against the labels, unshifted,
    # through forward= and the default loss; a loss_fn hook replaces it
    labels = batch["labels"]
    fwd = Cloner(teacher, student, layers, cloner.stats, keep_output=True,
                 forward=lambda m, b: m(input_ids=b["input_ids"],
                                        attention_mask=b["attention_mask"]))
    fwd(batch)
    logits = fwd.last.student_output.logits.detach()
    torch.testing.assert_close(fwd.last.ce, F.cross_entropy(logits.reshape(-1, V),
                                                            labels.reshape(-1)))
    hook = Cloner(teacher, student, layers, cloner.stats,
                  loss_fn=lambda out, b: out.logits.float().logsumexp(-1).mean())
    hook(batch)
    torch.testing.assert_close(hook.last.ce, logits.logsumexp(-1).mean())


def test_wrong_shape_mask_raises_naming_the_layer():
    teacher, student, layers = _pair("gpt2")
    cloner = Cloner(teacher, student, layers, _stats(teacher, layers))
    batch = _batch()
    am = batch["attention_mask"]
    for bad in (am[:, 1:], am.t()):
        with pytest.raises(ValueError, match=r"'transformer\.h\.0'.*rows \(3, 8\)"):
            cloner(batch, mask=bad)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\)"):
        collect_stats(teacher, [batch], layers, mask_fn=lambda b: b["attention_mask"].t()[:2])


def test_blocks_and_globs_resolve():
    for kind, (make, blocks) in MODELS.items():
        model = make(0)
        mods = dict(model.named_modules())
        expected = [f"{blocks}.0", f"{blocks}.1"]
        assert resolve_layers(model, "blocks") == expected
        assert resolve_layers(model, f"{blocks}.*") == expected
        assert resolve_layers(model, [f"{blocks}.*.mlp"]) == [f"{blocks}.0.mlp",
                                                               f"{blocks}.1.mlp"]
        names, modules = find_layers(model, [mods[expected[1]], expected[0]])
        assert names == [expected[1], expected[0]]
        assert modules == [mods[expected[1]], mods[expected[0]]]
    with pytest.raises(ValueError, match="matches no submodule"):
        resolve_layers(tiny_gpt2(0), "transformer.x.*")


class _Wrapper(nn.Module):
    """Like DDP / accelerate: holds the model as ``.module`` and forwards to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kw):
        return self.module(*args, **kw)


def test_names_resolve_through_wrappers():
    model = tiny_gpt2(0)
    inner = dict(model.named_modules())["transformer.h.1"]
    compiled = torch.compile(model, backend="eager")
    for wrapped in (compiled, _Wrapper(model), _Wrapper(compiled)):
        for name in ("transformer.h.1", "module.transformer.h.1", "_orig_mod.transformer.h.1",
                     "module._orig_mod.transformer.h.1"):
            names, modules = find_layers(wrapped, [name])
            assert names == ["transformer.h.1"] and modules == [inner]
        assert resolve_layers(wrapped, "blocks") == ["transformer.h.0", "transformer.h.1"]
        assert resolve_layers(wrapped, ["transformer.h.*"]) == ["transformer.h.0",
                                                                "transformer.h.1"]
    # a name given for the wrapped model resolves in the plain one
    assert resolve_layers(model, ["module._orig_mod.transformer.h.1"]) == ["transformer.h.1"]
    with ActivationCapture(_Wrapper(model), ["module.transformer.h.1"]) as cap, \
            torch.no_grad():
        model(**_batch())
        (a,) = cap.outputs()
    assert a.shape == (B, T, 16)


def test_collect_stats_dict_batches_count_real_tokens_only():
    teacher, _, layers = _pair("llama")
    batches = [_batch(1), _batch(2)]
    stats = collect_stats(teacher, batches, layers)
    store = {n: [] for n in layers}
    mods = dict(teacher.named_modules())
    hs = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: store[n].append(o[0] if isinstance(o, tuple) else o))
        for n in layers]
    with torch.no_grad():
        for b in batches:
            teacher(**b)
    for h in hs:
        h.remove()
    for n, mean, std in zip(layers, stats.mean, stats.std):
        rows = torch.cat([o[b["attention_mask"].bool()] for o, b in zip(store[n], batches)])
        rows = rows.double()
        torch.testing.assert_close(mean.double(), rows.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std.double(), rows.std(0, correction=0), rtol=1e-5,
                                   atol=1e-5)
    assert stats.count == 2 * B


def _reference(teacher, student, batch, layers, stats, tau=5.0, lam=10.0):
    """The Cloner's loss on a HF model in float64 PyTorch, hooks and autograd only."""
    tref = copy.deepcopy(teacher).double().requires_grad_(True)
    store, hs = {}, []
    for model, tag in ((tref, "t"), (student, "c")):
        mods = dict(model.named_modules())
        for n in layers:
            hs.append(mods[n].register_forward_hook(
                lambda m, i, o, k=(tag, n): store.__setitem__(
                    k, o[0] if isinstance(o, tuple) else o)))
    ce_t = tref(**batch).loss
    acts_t = [store["t", n] for n in layers]
    grads = torch.autograd.grad(ce_t, acts_t)
    ce = student(**batch).loss
    for h in hs:
        h.remove()
    mask = batch["attention_mask"].bool()
    total = ce.double()
    for n, t, g, mu, sd in zip(layers, acts_t, grads, stats.mean, stats.std):
        rows = float64_clone_rows(t, store["c", n], g, mu, sd, tau)
        total = total + lam * rows[mask].mean()
    return total


def test_cloner_equals_float64_reference():
    teacher, student, layers = _pair("gpt2")
    stats = _stats(teacher, layers)
    batch = _batch()
    cloner = Cloner(teacher, student, "blocks", stats)
    loss = cloner(batch)
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = _reference(teacher, student, batch, layers, cloner.stats)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-3, atol=1e-5)


# --- memory: allocated bytes per phase (the profiler's allocation events), not time ------------

def _gpt2(seed, vocab, layers, width, seq):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width,
                                  n_layer=layers, n_head=2, attn_pdrop=0.0, embd_pdrop=0.0,
                                  resid_pdrop=0.0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_batch(vocab, batch, seq, seed=0):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _phases(cloner, student, batch, step=None):
    """Bytes allocated per phase of one step (after a warm-up step), above its start."""
    from torch.profiler import record_function

    from medic_fast._memory import PHASES, allocated_by_phase

    def run():
        student.zero_grad(set_to_none=True)
        loss = step() if step else cloner(batch)
        with record_function("backward"):
            loss.backward()

    run()
    return allocated_by_phase(run, PHASES + ("backward",))


def test_the_teachers_pass_is_freed_before_the_students_forward():
    """With a vocabulary that makes the teacher's logits 64x its hooked activations: when the
    student's forward starts, only the teacher's activations and gradients at the hooked blocks
    are alive (2x the hooked activations), and the step's peak is at most 2.25x the hooked
    activations above a plain step's (it was 2x the teacher's logits above)."""
    vocab, batch_size, seq, width = 4096, 4, 32, 32
    teacher = _gpt2(0, vocab, 2, width, seq).eval().requires_grad_(False)
    student = _gpt2(1, vocab, 2, width, seq)
    batch = _lm_batch(vocab, batch_size, seq)
    layers = ["transformer.h.0", "transformer.h.1"]
    cloner = Cloner(teacher, student, layers, collect_stats(teacher, [batch], layers))
    hooked = 2 * batch_size * seq * width * 4
    assert batch_size * seq * vocab * 4 >= 64 * hooked
    ours = _phases(cloner, student, batch)
    plain = _phases(None, student, batch, step=lambda: student(**batch).loss)
    assert ours["medic_fast.student"]["start"] <= 2 * hooked, ours
    assert ours["step"]["peak"] - plain["step"]["peak"] <= 2.25 * hooked, (ours, plain)


def test_a_checkpointing_student_gets_a_checkpointed_teacher():
    """A student with gradient checkpointing on: the teacher's pass keeps one block's
    activations at a time (its peak under half the un-checkpointed pass's, on 6 blocks), and
    the step is the same: the same losses and student gradients."""
    vocab, batch_size, seq, width = 64, 4, 32, 32
    teacher = _gpt2(0, vocab, 6, width, seq).eval().requires_grad_(False)
    batch = _lm_batch(vocab, batch_size, seq)
    stats = collect_stats(teacher, [batch], "blocks")
    results = {}
    for ckpt in (False, True):
        student = _gpt2(1, vocab, 6, width, seq)
        if ckpt:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        cloner = Cloner(teacher, student, "blocks", stats)
        phases = _phases(cloner, student, batch)
        student.zero_grad()
        loss = cloner(batch)
        loss.backward()
        results[ckpt] = (phases["medic_fast.teacher"]["peak"], loss.detach(),
                         [p.grad.clone() for p in student.parameters()])
    (peak_off, loss_off, grads_off), (peak_on, loss_on, grads_on) = results[False], results[True]
    assert peak_on < 0.5 * peak_off, (peak_on, peak_off)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_loss_frees_its_inputs_and_refuses_a_second_backward():
    """``keep_inputs=False`` (the Cloner's): the gradient as with ``keep_inputs=True``; a second
    backward through the graph, or ``create_graph=True``, raises in one line."""
    import medic_fast

    torch.manual_seed(0)
    t, g = torch.randn(3, 4, 5), 1e-2 * torch.randn(3, 4, 5)
    c0 = t + torch.randn(3, 4, 5)
    grads = []
    for keep in (True, False):
        c = c0.clone().requires_grad_()
        loss = medic_fast.importance_clone_loss(t, c, g, tau=5.0, keep_inputs=keep)
        loss.backward(retain_graph=True)
        grads.append(c.grad.clone())
        if not keep:
            with pytest.raises(RuntimeError, match=r"keep_inputs=False\) keeps only the gradient"):
                loss.backward()
            loss = medic_fast.importance_clone_loss(t, c, g, tau=5.0, keep_inputs=False)
            with pytest.raises(RuntimeError, match="needs keep_inputs=True"):
                torch.autograd.grad(loss, c, create_graph=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
