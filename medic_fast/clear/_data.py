"""Helpers of CLEAR: batches of the accepted data forms (a ``Dataset``, a ``DataLoader``, or an
``(X, y)`` pair of tensors), and catching the input of one of a model's modules."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Tuple

import torch
from torch import Tensor, nn

from medic_fast.data import make_loader

BATCH = 256


def batches(data, batch_size: int = BATCH) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches of ``data`` (see :func:`medic_fast.data.make_loader`)."""
    for item in make_loader(data, batch_size=batch_size):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError("data must yield (inputs, labels, ...) batches, got "
                            f"{type(item).__name__}")
        yield item[0], torch.as_tensor(item[1])


@contextlib.contextmanager
def catch_input(module: nn.Module):
    """While active, ``caught[0]`` is the (first) input of ``module``'s latest call."""
    caught = [None]

    def hook(_, args):
        caught[0] = args[0].detach()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def inputs_of(module: nn.Module, run: Callable[[Tensor], Tensor], xs) -> Tensor:
    """The inputs ``module`` receives while ``run`` processes each tensor of ``xs``,
    concatenated."""
    out = []
    with catch_input(module) as caught, torch.no_grad():
        for x in xs:
            caught[0] = None
            run(x)
            if caught[0] is None:
                raise ValueError(f"{type(module).__name__} was not called on the way to the output")
            out.append(caught[0])
    return torch.cat(out)
