"""Helpers shared by the tests (on ``sys.path`` through ``pythonpath`` in pyproject.toml)."""
import copy

import pytest
import torch
from torch import nn

from medic_fast import _extension

from medic_fast.zoo import datasets


def digits(n=None, seed=0):
    X, y = datasets.load_digits()
    if n is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[:n]
        X, y = X[idx], y[idx]
    return X, y


class Pairs(torch.utils.data.Dataset):
    """A map-style Dataset of (x, y) samples (not a TensorDataset)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def badnets_trojan(epochs):
    """A small BadNets-trojaned DigitsCNN (8, 16, 16) trained ``epochs`` epochs, its clean split,
    a test split and the attack (target 0): the digits split 60/10/30, seed 0."""
    import medic_fast as mf
    from medic_fast import data
    from medic_fast.zoo import attacks, models

    X, y = datasets.load_digits()
    (Xtr, ytr), (Xc, yc), (Xte, yte) = data.split(X, y, [0.6, 0.1, 0.3], seed=0)
    atk = attacks.BadNets(size=3)
    p = atk.poison(Xtr, ytr, 0.1, 0, seed=0)
    model = mf.train_from_scratch(models.DigitsCNN((8, 16, 16)), (p.X, p.y), epochs=epochs,
                                  progress=False).model
    return model, (Xc, yc), (Xte, yte), atk


def frozen(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def double_backward_grads(model, layers, x, y):
    """The straightforward way: parameters and input require grad, every hooked tensor retains
    its grad, CE.backward() through everything."""
    model = copy.deepcopy(model).eval().requires_grad_(True)
    x = x.clone().requires_grad_()
    modules = dict(model.named_modules())
    acts = {}
    hooks = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: acts.__setitem__(n, o) or o.retain_grad()) for n in layers]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    return [acts[n].detach() for n in layers], [acts[n].grad for n in layers]


def float64_clone_rows(t, c, g, mean, std, tau, eps=1e-5):
    """Per-row importance clone losses in float64, written out from the paper's formula (eq.
    1-4, absolute criterion) as an oracle independent of the library: rows are all dims but the
    last; ``t``, ``g`` float64 already, ``c`` any float dtype (it keeps its graph)."""
    c = c.double()
    s = std.double() + eps
    a = tau * ((t - mean.double()) / s).abs()
    q = tau * s * g
    w = torch.sqrt(torch.softmax(a, -1) * torch.softmax(q, -1))
    return (w * ((t.detach() - c) / s) ** 2).sum(-1)


TINY_VOCAB = 50  # the vocabulary of the tiny Hugging Face models below


def tiny_gpt2(seed):
    """A 2-block GPT-2 LM (width 16, no dropout) built from a config after
    ``torch.manual_seed(seed)``: no download. Needs ``transformers``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=16, n_embd=16, n_layer=2,
                                  n_head=2, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_llama(seed):
    """A 2-layer Llama LM (width 16), as :func:`tiny_gpt2`."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def has_extension() -> bool:
    """Whether the C++ extension builds and loads here."""
    try:
        _extension.load()
        return True
    except _extension.ExtensionUnavailable:
        return False


needs_extension = pytest.mark.skipif(not has_extension(),
                                     reason="the C++ extension did not build")

CUDA = torch.cuda.is_available()
# Parametrise a test over devices with ``@pytest.mark.parametrize("device", DEVICES)``. Both cases
# are marked ``device``; the CUDA case is also marked ``cuda`` and is skipped where there is no
# GPU. ``tools/gpu_check.py`` runs ``-m cuda`` on a GPU, and ``-m "device and not cuda"`` (the
# same tests' CPU cases) for ``--cpu-dry-run``.
DEVICES = [pytest.param("cpu", marks=pytest.mark.device),
           pytest.param("cuda", marks=[pytest.mark.device, pytest.mark.cuda, pytest.mark.skipif(
               not CUDA, reason="no CUDA device")])]
