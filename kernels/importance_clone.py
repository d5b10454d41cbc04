"""Triton kernels of the importance clone loss (DESIGN.md §1): the loss and ``d loss / d acts_c``
in one pass over ``t``, ``g``, ``c``; and the backward's scale.

:func:`forward` is the op's kernel for CUDA tensors (see :mod:`medic_fast.ops.importance_clone`),
launched per layer with the layer's tensors as arguments: no launch tables, nothing copied from
the host, so a call can be captured in a CUDA graph. The tests run it on CPU tensors under
``TRITON_INTERPRET=1``.

Each layer is ``[rows, m]`` (unit stride along ``m``, any row stride). The statistics are the
caller's ``mean`` and ``std`` (any float dtype; statistic ``(i // inner) % numel`` of neuron ``i``):
``1 / (std + eps)`` and ``tau (std + eps)`` are computed in registers, so no derived value is kept
between calls.

1. Rows of at most :data:`ROW_MAX` neurons: ``_row_kernel``, one pass. A program holds a whole
   row (or a block of short rows) in registers: exact row maxima of ``a`` and ``q``, their sums,
   the loss, then ``dc`` written once at its final value. Bytes per element: read ``t, g, c``,
   write ``dc`` (4E, the floor), or 3E for the loss alone. The grid is persistent: each program
   loads the statistics once and walks rows ``pid, pid + programs, ...``.
2. Longer rows: split across programs (tiles of :data:`SPLIT_BLOCK`).
   ``_split_kernel``, one program per (row, split): one pass with an online softmax (running
   maxima, per-lane sums ``Sa = sum h_a^2``, ``Sq = sum h_q^2``, ``N = sum h_a h_q r^2`` with
   ``h = exp((x - M) / 2)``) and, with the gradient, each tile's provisional ``dc`` from the
   weights of the row seen so far, and the tile's maxima and log-norm. These prefix gradients are
   never smaller than the final ones; an fp16 tile that could come near 65504 before the rescale
   brings it down is stored times ``2**-e`` (``e`` folded into its log-norm; a power of two
   changes no rounding). ``_finish_kernel``, one program per (row, split): merges the row's split
   partials itself (no separate merge launch), writes the row loss (split 0) and rescales its
   tiles of ``dc`` in place. Bytes: 6E with the gradient, 3E without.
3. ``_scale_kernel`` (the backward, eager): multiplies a flat gradient buffer by the incoming
   gradient read on the device, and stores nothing when it is 1 (no host sync either way).

The loss: each row kernel writes one partial sum per program (or one value per row for
``reduction="none"``), the finish kernel one per row, all into one buffer per call; the caller
sums it. Launches run through the compiled kernel handle once a layer's plan has one
(:class:`Launch`), not through ``JITFunction.run``'s argument binding at every call.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Rows of up to ROW_MAX[dtype] neurons take the one-pass row kernel, the rest are split. Chosen
# from the spill report of the AOT compile (benchmarks/RESULTS.md §6): the largest power-of-two
# row block that compiles for both sm_80 and sm_90 without spills, at 8, 16 and 32 warps alike
# (8192 fits sm_80 but spills 184-256 bytes on sm_90; fp64 spills from 4096).
ROW_MAX = {torch.float32: 4096, torch.bfloat16: 4096, torch.float16: 4096, torch.float64: 2048}
ROW_WARPS = 16
# Short rows share a program: about ROW_TILE elements per iteration of the row loop. Elements
# per thread: 8, but 4 for row blocks below 64 and for float64, where Triton 3.6's ptxas spills
# 8 bytes at 8 (the grad variant for sm_80; float64 blocks of 512 for sm_90), and where 4 for
# every block spills the 128-blocks' (RESULTS.md §11).
ROW_TILE = 2048
# (BLOCK, num_warps) of the split kernels per dtype: 8 elements per thread, 16-byte accesses.
SPLIT = {torch.float32: (2048, 8), torch.bfloat16: (2048, 8), torch.float16: (2048, 8),
         torch.float64: (1024, 8)}
SCALE_BLOCK, SCALE_WARPS = 4096, 8
# Programs to aim for per streaming multiprocessor (CUDA), and on CPU under the interpreter.
_PROGRAMS_PER_SM, _PROGRAMS_INTERPRETER = 4, 8
# Column indices are int32 and statistic indices use _magic (exact below 2**31).
_MAX_M = 2**30
# The kernels keep a and q (and their maxima) multiplied by log2(e) / 2: h = exp((a - M) / 2)
# is then one exp2, and sums are normalised with log2.
_HALF_LOG2E = 0.5 * math.log2(math.e)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_kernel(t, c, g, dc, mean, std, out, rows, m, st, sc, sg, mu_inner, mu_n, sd_inner, sd_n,
                tau_hl, eps, row_scale, out_base, SIGNED: tl.constexpr, NEED_GRAD: tl.constexpr,
                PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                ROWS: tl.constexpr):
    """Loss (and gradient) of rows ``pid * ROWS + k * programs * ROWS + [0, ROWS)``, whole rows in
    registers. ``out[out_base + pid]``: the program's ``row_scale * sum_b loss_b``; with PER_ROW,
    ``out[out_base + b] = row_scale * loss_b`` instead."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, BLOCK)
    imask = i < m
    # The statistics, once per program: mu, 1 / s and tau s log2(e) / 2, with s = std + eps.
    mu = tl.load(mean + (i // mu_inner) % mu_n, mask=imask, other=0.0).to(ACC)
    s = tl.load(std + (i // sd_inner) % sd_n, mask=imask, other=1.0).to(ACC) + eps
    inv = (1.0 / s)[None, :]
    kq = (tau_hl * s)[None, :]
    mu = mu[None, :]
    col = i[None, :]
    total = tl.zeros((ROWS,), ACC)
    for r0 in range(pid * ROWS, rows, nprog * ROWS):
        r = r0 + tl.arange(0, ROWS)
        rmask = r < rows
        mask = rmask[:, None] & imask[None, :]
        r64 = r.to(tl.int64)[:, None]
        tv = tl.load(t + r64 * st + col, mask=mask, other=0.0).to(ACC)
        cv = tl.load(c + r64 * sc + col, mask=mask, other=0.0).to(ACC)
        rr = (tv - cv) * inv
        z = (tv - mu) * inv
        if not SIGNED:
            z = tl.abs(z)
        a = tl.where(mask, tau_hl * z, float("-inf"))
        gv = tl.load(g + r64 * sg + col, mask=mask, other=0.0).to(ACC)
        q = tl.where(mask, gv * kq, float("-inf"))
        ma = tl.where(rmask, tl.max(a, 1), 0.0)
        mq = tl.where(rmask, tl.max(q, 1), 0.0)
        ha = tl.exp2(a - ma[:, None])
        hq = tl.exp2(q - mq[:, None])
        ss = tl.where(rmask, tl.sum(ha * ha, 1) * tl.sum(hq * hq, 1), 1.0)
        norm = 1.0 / tl.sqrt(ss)
        w = ha * hq
        loss = tl.sum(w * rr * rr, 1) * norm
        if NEED_GRAD:
            d = ((-2.0 * row_scale) * norm)[:, None] * w * rr * inv
            tl.store(dc + r64 * m + col, d.to(dc.dtype.element_ty), mask=mask)
        if PER_ROW:
            tl.store(out + out_base + r, loss * row_scale, mask=rmask)
        else:
            total += tl.where(rmask, loss, 0.0)
    if not PER_ROW:
        tl.store(out + out_base + pid, tl.sum(total, 0) * row_scale)


@triton.jit
def _udiv(n, mul, shift):
    """``n // d`` for int32 ``0 <= n < 2**31``, with uint32 ``(mul, shift) = _magic(d)``."""
    return (tl.umulhi(n.to(tl.uint32) * 2, mul) >> shift).to(tl.int32)


@triton.jit
def _stat_index(i, inner_mul, inner_shift, n, n_mul, n_shift):
    """``(i // inner) % n`` by two multiply-high divisions."""
    ch = _udiv(i, inner_mul.to(tl.uint32), inner_shift.to(tl.uint32))
    return ch - n * _udiv(ch, n_mul.to(tl.uint32), n_shift.to(tl.uint32))


@triton.jit
def _split_kernel(t, c, g, dc, mean, std, part, tiles, m, st, sc, sg,
                  mu_inner_mul, mu_inner_shift, mu_n, mu_n_mul, mu_n_shift,
                  sd_inner_mul, sd_inner_shift, sd_n, sd_n_mul, sd_n_shift,
                  nsplit, per, ntiles, tile_base, tau_hl, eps, row_scale, SIGNED: tl.constexpr,
                  NEED_GRAD: tl.constexpr, SAME_STATS: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Online-softmax partials of one split of one row into ``part``; with NEED_GRAD its tiles'
    prefix gradients into ``dc`` and their records (maxima, log-norm) into ``tiles`` from
    ``tile_base`` on (``part`` and ``tiles`` may be one buffer).
    SAME_STATS: mean and std share one layout (one statistic index per neuron)."""
    j = tl.program_id(0)
    row = j // nsplit
    lo = (j - row * nsplit).to(tl.int32) * per
    hi = tl.minimum(lo + per, ntiles)
    r64 = row.to(tl.int64)
    t_row = t + r64 * st
    c_row = c + r64 * sc
    g_row = g + r64 * sg
    dc_row = dc + r64 * m
    tile_rec = tiles + tile_base + r64 * ntiles * 3
    is_fp16: tl.constexpr = dc.dtype.element_ty == tl.float16
    ma = tl.full((), float("-inf"), ACC)
    mq = tl.full((), float("-inf"), ACC)
    # per-lane sums, relative to the running maxima: reduced once per split (and per tile for
    # the gradient's normaliser)
    sa = tl.zeros((BLOCK,), ACC)
    sq = tl.zeros((BLOCK,), ACC)
    num = tl.zeros((BLOCK,), ACC)
    for tile in range(lo, hi):
        i = tile * BLOCK + tl.arange(0, BLOCK)
        mask = i < m
        k_mu = _stat_index(i, mu_inner_mul, mu_inner_shift, mu_n, mu_n_mul, mu_n_shift)
        if SAME_STATS:
            k_sd = k_mu
        else:
            k_sd = _stat_index(i, sd_inner_mul, sd_inner_shift, sd_n, sd_n_mul, sd_n_shift)
        t_ = tl.load(t_row + i, mask=mask, other=0.0).to(ACC)
        c_ = tl.load(c_row + i, mask=mask, other=0.0).to(ACC)
        g_ = tl.load(g_row + i, mask=mask, other=0.0).to(ACC)
        mu = tl.load(mean + k_mu, mask=mask, other=0.0).to(ACC)
        s = tl.load(std + k_sd, mask=mask, other=1.0).to(ACC) + eps
        inv = 1.0 / s
        z = (t_ - mu) * (tau_hl * inv)
        if not SIGNED:
            z = tl.abs(z)
        a = tl.where(mask, z, float("-inf"))
        q = tl.where(mask, (tau_hl * s) * g_, float("-inf"))
        r = (t_ - c_) * inv
        ma_new = tl.maximum(ma, tl.max(a, 0))
        mq_new = tl.maximum(mq, tl.max(q, 0))
        ea = tl.exp2(ma - ma_new)
        eq = tl.exp2(mq - mq_new)
        ha = tl.exp2(a - ma_new)
        hq = tl.exp2(q - mq_new)
        w = ha * hq
        sa = sa * (ea * ea) + ha * ha
        sq = sq * (eq * eq) + hq * hq
        num = num * (ea * eq) + w * r * r
        ma, mq = ma_new, mq_new
        if NEED_GRAD:
            ss = tl.sum(sa, 0) * tl.sum(sq, 0)
            d = (-2.0 * row_scale) / tl.sqrt(ss) * w * r * inv
            log_norm = 0.5 * tl.log2(ss)
            if is_fp16:
                # Keep the provisional tile below fp16's overflow: store it times 2**-e, e >= 0
                # an integer putting its largest value under 2**14 (2**15 if log2 is off by
                # one), and fold e into the tile's log-norm, which the rescale divides by.
                top = tl.maximum(tl.max(tl.abs(d), 0), 1.0)
                e = tl.maximum(tl.floor(tl.log2(top)) - 13.0, 0.0)
                d = d * tl.exp2(-e)
                log_norm = log_norm + e
            rec = tile_rec + tile * 3
            tl.store(rec, ma)
            tl.store(rec + 1, mq)
            tl.store(rec + 2, log_norm)
            tl.store(dc_row + i, d.to(dc.dtype.element_ty), mask=mask)
    rec = part + j.to(tl.int64) * 5
    tl.store(rec, ma)
    tl.store(rec + 1, tl.sum(sa, 0))
    tl.store(rec + 2, mq)
    tl.store(rec + 3, tl.sum(sq, 0))
    tl.store(rec + 4, tl.sum(num, 0))


@triton.jit
def _finish_kernel(dc, part, tiles, out, m, nsplit, per, ntiles, tile_base, progs, row_scale,
                   out_base,
                   NEED_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                   NSPLIT: tl.constexpr):
    """Merge the split partials of one row; split 0 writes ``out[out_base + row] = row_scale *
    loss``; with NEED_GRAD each program (``progs`` per row) rescales its split's tiles of ``dc``
    from the weights their partials saw to the weights of the row."""
    pid = tl.program_id(0)
    row = pid // progs
    j = pid - row * progs
    r64 = row.to(tl.int64)
    k = tl.arange(0, NSPLIT)
    kmask = k < nsplit
    rec = part + (r64 * nsplit + k) * 5
    ma_s = tl.load(rec, mask=kmask, other=float("-inf"))
    mq_s = tl.load(rec + 2, mask=kmask, other=float("-inf"))
    ma = tl.max(ma_s, 0)
    mq = tl.max(mq_s, 0)
    fa = tl.exp2(ma_s - ma)
    fq = tl.exp2(mq_s - mq)
    sa = tl.sum(tl.load(rec + 1, mask=kmask, other=0.0) * (fa * fa), 0)
    sq = tl.sum(tl.load(rec + 3, mask=kmask, other=0.0) * (fq * fq), 0)
    num = tl.sum(tl.load(rec + 4, mask=kmask, other=0.0) * (fa * fq), 0)
    ss = sa * sq
    if j == 0:
        tl.store(out + out_base + row, num / tl.sqrt(ss) * row_scale)
    if NEED_GRAD:
        ls = 0.5 * tl.log2(ss)
        lo = j.to(tl.int32) * per
        hi = tl.minimum(lo + per, ntiles)
        dc_row = dc + r64 * m
        tile_rec = tiles + tile_base + r64 * ntiles * 3
        for tile in range(lo, hi):
            rec_t = tile_rec + tile * 3
            f = tl.exp2((tl.load(rec_t) - ma) + (tl.load(rec_t + 1) - mq)
                        + (tl.load(rec_t + 2) - ls))
            i = tile * BLOCK + tl.arange(0, BLOCK)
            mask = i < m
            d = tl.load(dc_row + i, mask=mask, other=0.0).to(ACC)
            tl.store(dc_row + i, (d * f).to(dc.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x, n, grad, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``x *= grad`` (a one-element tensor), and nothing stored where ``grad == 1``."""
    gv = tl.load(grad).to(ACC)
    if gv != 1.0:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        v = tl.load(x + i, mask=mask, other=0.0).to(ACC)
        tl.store(x + i, (v * gv).to(x.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: plans (layout only, made once per layout) and launches
# --------------------------------------------------------------------------------------------

def _magic(d: int) -> tuple[int, int]:
    """``(mul, shift)`` with ``mul < 2**32`` and ``n // d == umulhi(2n, mul) >> shift``, n < 2**31.

    Granlund & Montgomery (1994), Thm 4.2 with N = 31: ``n // d == (n * mul) >> (31 + shift)``;
    the kernels thus divide with one 32-bit multiply-high instead of an integer division.
    """
    ell = (d - 1).bit_length()
    return (1 << (31 + ell)) // d + 1, ell


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=None)
def target_programs(device: torch.device) -> int:
    """Programs that fill ``device``: a few per streaming multiprocessor, or a handful on CPU
    (the interpreter)."""
    if device.type != "cuda":
        return _PROGRAMS_INTERPRETER
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


class Launch:
    """One kernel launch of a layer's plan: kernel, grid, constexprs, and the compiled handle
    once the first launch has made it.

    The handle skips ``JITFunction.run`` (argument binding, specialisation key, cache lookup),
    which costs more than the kernel at small sizes. It is valid for the arguments' types and
    Triton's specialisations (16-byte alignment of pointers; ints equal to 1 or divisible by
    16), which the op's plan key fixes: every int comes from the plan, every pointer's alignment
    is in the key. Not used under the interpreter, when a launch hook is set (profilers), or while
    tracing (``wrap_triton``).
    """

    __slots__ = ("kernel", "grid", "constexprs", "num_warps", "handle")

    def __init__(self, kernel, grid, constexprs, num_warps):
        self.kernel, self.grid, self.constexprs = kernel, grid, constexprs
        self.num_warps, self.handle = num_warps, None

    def __call__(self, *args, traced=False):
        if traced:
            from torch.library import wrap_triton

            wrap_triton(self.kernel)[self.grid](*args, **self.constexprs,
                                                num_warps=self.num_warps)
            return
        handle = self.handle
        if handle is None or triton.knobs.runtime.launch_enter_hook is not None:
            compiled = self.kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps)
            if args[0].is_cuda and not hasattr(compiled, "result"):
                self.handle = compiled
            return
        stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())
        handle.run(self.grid[0], 1, 1, stream, handle.function, handle.packed_metadata, None,
                   None, triton.knobs.runtime.launch_exit_hook, *args,
                   *self.constexprs.values())


class LayerPlan(NamedTuple):
    """How one layer runs: its launches and the sizes of the buffers they use."""

    rows: int
    m: int
    split: bool
    args: tuple  # the layer's int arguments, after the tensors (kernel-specific)
    first: Launch  # the row kernel, or the split kernel
    finish: Launch | None  # the split path's merge (and rescale)
    n_out: int  # entries of the loss buffer it writes
    n_part: int  # scratch of the split path, acc dtype: partials (5 per (row, split)), then
    n_tiles: int  # tile records (3 per tile)


def row_shape(m: int, rows: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` of the row kernel for ``rows`` rows of ``m`` neurons."""
    block = max(16, triton.next_power_of_2(m))
    rows_per = min(max(1, ROW_TILE // block), triton.next_power_of_2(rows))
    per_thread = 4 if block < 64 or dtype == torch.float64 else 8
    return block, rows_per, min(ROW_WARPS, max(1, block * rows_per // (32 * per_thread)))


def plan_layer(rows: int, m: int, strides: tuple[int, int, int], mu_layout: tuple[int, int],
               sd_layout: tuple[int, int], dtype: torch.dtype, device: torch.device, *,
               signed: bool, need_grad: bool, per_row: bool) -> LayerPlan:
    """The launches of one ``[rows, m]`` layer of ``dtype`` on ``device``; ``strides``: the row
    strides of ``t, c, g``; ``*_layout``: ``(inner, numel)`` of the mean and std (statistic
    ``(i // inner) % numel`` of neuron ``i``); ``per_row``: one loss per row (``reduction=
    "none"``) rather than a partial sum per program."""
    if m > _MAX_M:
        raise ValueError(f"rows of more than {_MAX_M} neurons are not supported (got {m})")
    acc = _TL[_acc(dtype)]
    target = target_programs(device)
    if m <= ROW_MAX[dtype]:
        block, rows_per, warps = row_shape(m, rows, dtype)
        programs = min(triton.cdiv(rows, rows_per), target)
        first = Launch(_row_kernel, (programs,),
                       dict(SIGNED=signed, NEED_GRAD=need_grad, PER_ROW=per_row, ACC=acc,
                            BLOCK=block, ROWS=rows_per), warps)
        args = (rows, m, *strides, *mu_layout, *sd_layout)
        return LayerPlan(rows, m, False, args, first, None, rows if per_row else programs, 0, 0)
    block, warps = SPLIT[dtype]
    ntiles = triton.cdiv(m, block)
    per = triton.cdiv(ntiles, max(1, min(ntiles, target // rows)))
    nsplit = triton.cdiv(ntiles, per)
    first = Launch(_split_kernel, (rows * nsplit,),
                   dict(SIGNED=signed, NEED_GRAD=need_grad, SAME_STATS=mu_layout == sd_layout,
                        ACC=acc, BLOCK=block), warps)
    progs = nsplit if need_grad else 1
    finish = Launch(_finish_kernel, (rows * progs,),
                    dict(NEED_GRAD=need_grad, ACC=acc, BLOCK=block,
                         NSPLIT=max(2, triton.next_power_of_2(nsplit))), warps)
    stats = []
    for inner, n in (mu_layout, sd_layout):
        stats += [*_magic(inner), n, *_magic(n)]
    args = (m, *strides, *stats, nsplit, per, ntiles, progs)
    return LayerPlan(rows, m, True, args, first, finish, rows, rows * nsplit * 5,
                     rows * ntiles * 3 if need_grad else 0)


def run_layer(lp: LayerPlan, t, c, g, mean, std, dc, out, out_base: int, scratch, tau: float,
              eps: float, row_scale: float, traced: bool = False) -> None:
    """Launch one layer's kernels. ``dc``: its ``[rows, m]`` gradient (any tensor when not
    needed); ``out``: the call's loss buffer, written from ``out_base``; ``scratch``: at least
    ``lp.n_part + lp.n_tiles`` values of the accumulation dtype (split layers)."""
    tau_hl = tau * _HALF_LOG2E
    if not lp.split:
        lp.first(t, c, g, dc, mean, std, out, *lp.args, tau_hl, eps, row_scale, out_base,
                 traced=traced)
        return
    m, st, sc, sg, *stats, nsplit, per, ntiles, progs = lp.args
    lp.first(t, c, g, dc, mean, std, scratch, scratch, m, st, sc, sg, *stats, nsplit, per, ntiles,
             lp.n_part, tau_hl, eps, row_scale, traced=traced)
    lp.finish(dc, scratch, scratch, out, m, nsplit, per, ntiles, lp.n_part, progs, row_scale,
              out_base, traced=traced)


_SCALE = {}


def scale_(x: torch.Tensor, grad: torch.Tensor) -> None:
    """``x *= grad`` in place on ``x``'s device, ``grad`` a one-element tensor there: one launch,
    which stores nothing when ``grad`` is 1 (read on the device: no host sync)."""
    n = x.numel()
    # Everything the compiled handle is specialised on: device, dtypes, the grid, Triton's
    # specialisation of n (1, a multiple of 16) and the gradient's 16-byte alignment.
    key = (x.device, x.dtype, grad.dtype, triton.cdiv(n, SCALE_BLOCK), n == 1, n % 16 == 0,
           grad.data_ptr() % 16 == 0)
    launch = _SCALE.get(key)
    if launch is None:
        launch = _SCALE[key] = Launch(_scale_kernel, (key[3],),
                                      dict(ACC=_TL[_acc(x.dtype)], BLOCK=SCALE_BLOCK),
                                      SCALE_WARPS)
    launch(x, n, grad)


def aot_variants():
    """Every kernel specialisation the plans launch, for ``python tools/gpu_compile.py``: the
    row kernel at each row block with as many rows as share a program (fewer rows, as for a
    small batch, hold fewer registers), the split kernels at their block.

    Yields ``(kernel, signature, constexprs, num_warps, name)``.
    """
    tl_dtypes = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                 torch.float16: tl.float16, torch.float64: tl.float64}
    ints = dict.fromkeys
    for dtype, dt in tl_dtypes.items():
        acc = _TL[_acc(dtype)]
        ptr, buf = f"*{dt.name}", f"*{acc.name}"
        io = dict(t=ptr, c=ptr, g=ptr, dc=ptr, mean="*fp32", std="*fp32")
        for block in (2**k for k in range(4, ROW_MAX[dtype].bit_length())):
            block, rows, warps = row_shape(block, ROW_TILE, dtype)
            for signed in (False, True):
                for need_grad in (False, True):
                    yield (_row_kernel,
                           dict(**io, out=buf, **ints(("rows", "m", "st", "sc", "sg", "mu_inner",
                                                       "mu_n", "sd_inner", "sd_n"), "i32"),
                                tau_hl="fp32", eps="fp32", row_scale="fp32", out_base="i32"),
                           dict(SIGNED=signed, NEED_GRAD=need_grad, PER_ROW=False, ACC=acc,
                                BLOCK=block, ROWS=rows), warps,
                           f"{dt.name} BLOCK={block} ROWS={rows} {'signed' if signed else 'abs'}"
                           f"{' grad' if need_grad else ''}")
        block, warps = SPLIT[dtype]
        for need_grad in (False, True):
            for same in (False, True):
                yield (_split_kernel,
                       dict(**io, part=buf, tiles=buf,
                            **ints(("m", "st", "sc", "sg", "mu_inner_mul", "mu_inner_shift",
                                    "mu_n", "mu_n_mul", "mu_n_shift", "sd_inner_mul",
                                    "sd_inner_shift", "sd_n", "sd_n_mul", "sd_n_shift", "nsplit",
                                    "per", "ntiles", "tile_base"), "i32"),
                            tau_hl="fp32", eps="fp32", row_scale="fp32"),
                       dict(SIGNED=False, NEED_GRAD=need_grad, SAME_STATS=same, ACC=acc,
                            BLOCK=block), warps,
                       f"{dt.name} BLOCK={block}{' grad' if need_grad else ''}"
                       f"{' same-stats' if same else ''}")
            yield (_finish_kernel,
                   dict(dc=ptr, part=buf, tiles=buf, out=buf,
                        **ints(("m", "nsplit", "per", "ntiles", "tile_base", "progs"), "i32"),
                        row_scale="fp32",
                        out_base="i32"),
                   dict(NEED_GRAD=need_grad, ACC=acc, BLOCK=block, NSPLIT=256), warps,
                   f"{dt.name} BLOCK={block} NSPLIT=256{' grad' if need_grad else ''}")
        yield (_scale_kernel, dict(x=ptr, n="i32", grad=buf),
               dict(ACC=acc, BLOCK=SCALE_BLOCK), SCALE_WARPS, f"{dt.name}")


class CallPlan(NamedTuple):
    """The launches of one call and the buffers they need: the per-layer plans, the loss buffer,
    one scratch buffer per accumulation dtype (split layers reuse it in turn), and the
    gradients' layout (those of one dtype are views of one buffer, so that the backward scales
    them in one launch)."""

    layers: list  # LayerPlan per layer
    out_dtype: torch.dtype
    n_out: int
    out_base: list  # per layer
    scratch: dict  # acc dtype -> elements
    flat: dict  # dtype -> elements
    dc_layout: list  # per layer: (shape, strides, offset) of its view of its dtype's buffer


def plan_call(t, c, g, mean, std, start_dim, mean_inner, std_inner, criterion, reduce_rows,
              need_grad) -> CallPlan:
    """The :class:`CallPlan` of the op's arguments (their layout: shapes, strides, dtypes)."""
    from medic_fast.ops.importance_clone import _row_stride  # the op's layout rule

    device = t[0].device
    layers = [plan_layer(x.shape[:d].numel(), x.shape[d:].numel(),
                         tuple(_row_stride(y, d) for y in (x, cx, gx)), (mi, mu.numel()),
                         (si, sd.numel()), x.dtype, device, signed=criterion == 1,
                         need_grad=need_grad, per_row=not reduce_rows)
              for x, cx, gx, mu, sd, d, mi, si in zip(t, c, g, mean, std, start_dim,
                                                      mean_inner, std_inner)]
    out_base, n_out, scratch, flat, dc_layout = [], 0, {}, {}, []
    for x, lp in zip(t, layers):
        out_base.append(n_out)
        n_out += lp.n_out
        if lp.split:
            acc = _acc(x.dtype)
            scratch[acc] = max(scratch.get(acc, 0), lp.n_part + lp.n_tiles)
        offset = flat.get(x.dtype, 0)
        dc_layout.append((x.shape, _contiguous_strides(x.shape), offset))
        flat[x.dtype] = offset + (x.numel() + 15) // 16 * 16
    wide = any(x.dtype == torch.float64 for x in t)
    return CallPlan(layers, torch.float64 if wide else torch.float32, n_out, out_base, scratch,
                    flat if need_grad else {}, dc_layout)


def forward(t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, criterion, row_scale,
            reduce_rows, need_grad, *, plan=None, flat=False, traced=False):
    """The op's contract (:func:`medic_fast.ops.importance_clone._fused_loss`) on Triton.

    ``plan``: the call's :class:`CallPlan` (made from the tensors when None). ``flat``: the
    gradients of one dtype are views of one buffer, and the buffers are returned too (``(loss,
    dcs, buffers)``), for :func:`scale_`. ``traced``: launch through ``wrap_triton`` (inside the
    op's ``triton_op`` body). Every tensor is on one device; the launches run on it, on its
    current stream.
    """
    device = t[0].device
    if plan is None:
        plan = plan_call(t, c, g, mean, std, start_dim, mean_inner, std_inner, criterion,
                         reduce_rows, need_grad)
    if device.type == "cuda" and not traced and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return forward(t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps,
                           criterion, row_scale, reduce_rows, need_grad, plan=plan, flat=flat)
    out = torch.empty(plan.n_out, dtype=plan.out_dtype, device=device)
    scratch = {acc: torch.empty(n, dtype=acc, device=device) for acc, n in plan.scratch.items()}
    dcs, buffers = _outputs(plan, c, flat) if need_grad else ([], [])
    for li, lp in enumerate(plan.layers):
        run_layer(lp, t[li], c[li], g[li], mean[li], std[li], dcs[li] if need_grad else t[li],
                  out, plan.out_base[li], scratch.get(_acc(t[li].dtype)), tau, eps,
                  row_scale[li], traced)
    if not reduce_rows:
        loss = out.view(len(plan.layers), -1).sum(0) if len(plan.layers) > 1 else out
    else:
        loss = out.view(()) if plan.n_out == 1 else out.sum()
    return (loss, dcs, buffers) if flat else (loss, dcs)


def _outputs(plan: CallPlan, c, flat: bool):
    """Uninitialised gradients shaped like ``c`` and, with ``flat``, the buffers they view."""
    device = c[0].device
    if not flat:
        return [torch.empty(x.shape, dtype=x.dtype, device=device) for x in c], []
    if len(c) == 1:
        dc = torch.empty(c[0].shape, dtype=c[0].dtype, device=device)
        return [dc], [dc]
    buffers = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in plan.flat.items()}
    return ([buffers[x.dtype].as_strided(*layout) for x, layout in zip(c, plan.dc_layout)],
            list(buffers.values()))


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))
