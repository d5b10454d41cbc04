"""The chunked teacher head (medic_fast.medic.head): the loss and the hooked layers' gradients
against the unchunked causal-LM loss in float64 (GPT-2 and Llama), with padding and
num_items_in_batch; a Cloner step the same with and without it; a head that is not a linear
layer, and a loss that is not the head's CE, fall back with one warning; the teacher's pass
holds no [B, T, V] logits."""
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install medic-fast[hf])")

from medic_fast._memory import PHASES, allocated_by_phase  # noqa: E402
from medic_fast.capture import ActivationCapture, teacher_signals  # noqa: E402
from medic_fast.medic.cloner import Cloner  # noqa: E402
from medic_fast.medic.head import chunked_lm_loss  # noqa: E402
from medic_fast.stats import collect_stats  # noqa: E402
from shared import TINY_VOCAB, tiny_gpt2, tiny_llama  # noqa: E402

B, T = 3, 8
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _batch(seed=0, vocab=TINY_VOCAB):
    """Random tokens, right-padded to unequal lengths (mask 0 and labels -100 there)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor([T, 5, 2])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _reference(model, batch):
    """The causal-LM loss from whole float64 logits: labels shifted by one, -100 ignored, the
    mean over labelled tokens (or the sum over num_items_in_batch)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    hidden = model.base_model(**inputs)[0]
    logits = model.get_output_embeddings()(hidden)[:, :-1].flatten(0, 1)
    labels = batch["labels"][:, 1:].flatten()
    n = batch.get("num_items_in_batch", (labels != -100).sum())
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n


def _signals(model, loss):
    cap = ActivationCapture(model, "blocks", differentiable=True)
    with cap:
        return teacher_signals(model, cap, None, None, loss=loss)


@pytest.mark.parametrize("items", [None, 40], ids=["mean", "num_items"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_chunked_loss_and_gradients_match_float64_reference(arch, items):
    model = MODELS[arch](0).double().eval().requires_grad_(False)
    batch = _batch()
    if items is not None:
        batch["num_items_in_batch"] = torch.tensor(items)
    ref_acts, ref_grads = _signals(model, lambda: _reference(model, batch))
    ref = _reference(model, batch)
    assert any(g.abs().max() > 1e-6 for g in ref_grads)
    for chunk in (None, 1, 5, B * T, 4096):
        acts, grads = _signals(model, lambda: chunked_lm_loss(model, batch, chunk))
        torch.testing.assert_close(chunked_lm_loss(model, batch, chunk), ref, rtol=1e-12,
                                   atol=0)
        for a, b in zip(acts + grads, ref_acts + ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # and the model's own loss (which Hugging Face computes in float32)
    if items is None:
        torch.testing.assert_close(chunked_lm_loss(model, batch), model(**batch).loss.double(),
                                   rtol=1e-6, atol=0)


def _cloner_step(teacher, student, chunk, batch):
    stats = collect_stats(teacher, [batch], "blocks")
    cloner = Cloner(teacher, student, "blocks", stats, tau=5.0, lam=10.0, head_chunk=chunk,
                    backend="reference")
    student.zero_grad(set_to_none=True)
    loss = cloner(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("arch", list(MODELS))
def test_cloner_step_is_the_same_with_the_chunked_head(arch):
    teacher = MODELS[arch](0).double().eval().requires_grad_(False)
    student = MODELS[arch](1).double()
    batch = _batch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the chunked head applies: no fallback warning
        chunked = _cloner_step(teacher, student, 4, batch)
    plain = _cloner_step(teacher, student, 0, batch)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=0)
    for a, b in zip(chunked[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


class ScaledGPT2(transformers.GPT2LMHeadModel):
    """Logits scaled by 2 before the loss: not the linear head's CE."""

    def forward(self, labels=None, **kw):
        out = super().forward(**kw)
        out.logits = 2 * out.logits
        if labels is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return out


def _tanh_head(seed):
    model = tiny_gpt2(seed)
    model.lm_head = torch.nn.Sequential(model.lm_head, torch.nn.Tanh())
    return model


@pytest.mark.parametrize("make", [_tanh_head, lambda s: ScaledGPT2(tiny_gpt2(s).config)],
                         ids=["tanh-head", "scaled-logits"])
def test_other_heads_fall_back_with_one_warning(make):
    teacher, student = make(0).eval().requires_grad_(False), make(1)
    batch = _batch(2)
    with pytest.warns(UserWarning, match="keeps its .B, T, V. logits") as record:
        chunked = _cloner_step(teacher, student, 4, batch)
        stats = collect_stats(teacher, [batch], "blocks")
        cloner = Cloner(teacher, student, "blocks", stats, head_chunk=4, backend="reference")
        for _ in range(2):
            cloner(batch)
    assert sum("logits" in str(w.message) for w in record) == 2  # once per Cloner
    plain = _cloner_step(teacher, student, 0, batch)
    torch.testing.assert_close(chunked[0], plain[0])


def test_teacher_pass_holds_no_whole_logits():
    """Vocabulary 4096: whole logits are B*T*V*4 = 384 KiB, their log-softmax and gradient as
    much again; the chunked head (4 tokens) holds one chunk's (64 KiB)."""
    cfg = transformers.GPT2Config(vocab_size=4096, n_positions=16, n_embd=16, n_layer=2,
                                  n_head=2, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    teacher = transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    student = transformers.GPT2LMHeadModel(cfg)
    batch = _batch(3, vocab=4096)
    stats = collect_stats(teacher, [batch], "blocks")
    logits = B * T * 4096 * 4
    peaks = {}
    for chunk in (0, 4):
        cloner = Cloner(teacher, student, "blocks", stats, head_chunk=chunk, backend="reference")
        cloner(batch).backward()  # the first step checks the head
        peaks[chunk] = allocated_by_phase(lambda: cloner(batch).backward())[PHASES[0]]["peak"]
    assert peaks[0] > 2 * logits
    assert peaks[4] < logits / 2, peaks
