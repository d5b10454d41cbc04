"""Running every fused kernel of the ops, with or without a GPU.

CPU tensors run the C++ op ``medic_fast::importance_clone_loss_cpu``, and ``"triton"``
is refused for them. Where there is no GPU, Triton's interpreter (``TRITON_INTERPRET=1``, set in
``tests/conftest.py``) runs the Triton kernels on CPU tensors, though, so for the tests the Triton
launcher can stand in as the op's CPU kernel: the Triton path then runs through the real op, with
its autograd, fake and compile support, and the library needs no special case for the
interpreter. Where there is a GPU, Triton compiles for it instead: the CUDA cases of
``device_backends`` (test_importance_clone.py) run the op on CUDA tensors, and the interpreter
cases are skipped.
"""
import contextlib
import warnings

import pytest
import torch

from medic_fast import _extension

INTERPRETER_SKIP = ("Triton compiles for the GPU here: its interpreter runs the kernels on CPU "
                    "tensors only where there is no GPU (the cuda cases run them)")


@contextlib.contextmanager
def triton_as_cpu_kernel():
    """Inside, the Triton launcher is the CPU kernel of ``medic_fast::importance_clone_loss_cpu``
    (the op every CPU call of the loss runs, eager or traced);
    leaving restores the C++ kernel. Fails if the Triton kernel never ran."""
    from medic_fast.kernels import importance_clone

    _extension.load()  # the C++ kernel first: it must be the one overridden, not the overrider
    calls = []

    def kernel(*args):
        calls.append(1)
        return importance_clone.forward(*args)

    with torch.library._scoped_library("medic_fast", "IMPL") as lib:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"(?s).*Overriding a previously registered kernel")
            lib.impl("importance_clone_loss_cpu", kernel, "CPU")
        yield
    assert calls, "the Triton kernel never ran"


@pytest.fixture
def device():
    """The tensors' device of a test that is not parametrised over devices."""
    return "cpu"


@pytest.fixture
def backend_arg(backend, device):
    """The ``backend=`` that runs the parametrised ``backend`` on ``device``: the name itself,
    except ``"triton"`` on CPU tensors, which runs as the op's CPU kernel (the interpreter) and so
    is named ``"cpp"``; skipped where there is a GPU."""
    if backend == "reference" or device != "cpu":
        yield backend
    elif backend == "triton":
        if torch.cuda.is_available():
            pytest.skip(INTERPRETER_SKIP)
        with triton_as_cpu_kernel():
            yield "cpp"
    else:
        _extension.load()  # opcheck calls the op directly, without the public function's resolver
        yield backend


@pytest.fixture
def one_thread():
    """One thread for the test (restored after), for small problems on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
