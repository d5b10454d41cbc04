"""Triton kernels of the importance clone loss (DESIGN.md §1): the loss and ``d loss / d acts_c``
in one pass over ``t``, ``g``, ``c``.

:func:`forward` is the CUDA kernel of the op ``medic_fast::importance_clone_loss`` (see
:mod:`medic_fast.ops.importance_clone`); the tests run it on CPU tensors under
``TRITON_INTERPRET=1``.

The layers of one dtype (and alignment) share three grouped launches. An int64 table holds, per
layer, a :class:`Layer` row: its data pointers, strides, shape and work split; each program finds
its layer by counting the layers whose first program id is at or below its own (one vectorised
load per 64 layers).

1. ``_partials_kernel``, one program per (layer, row, split), a split being a run of ``BLOCK``-wide
   tiles of one row: one pass with an online softmax of ``a`` and ``q``. It keeps the running
   maxima ``Ma``, ``Mq`` (one block reduction each per tile) and per-lane sums ``Sa = sum h_a^2``,
   ``Sq = sum h_q^2``, ``N = sum h_a h_q r^2`` with ``h_a = exp((a - Ma) / 2)``, ``h_q = exp((q -
   Mq) / 2)``: two exps per element, no sqrt, sums reduced once per split.
   With the gradient, each tile stores ``-2 * row_scale * w_i * r_i * inv_s_i`` where ``w`` are the
   weights of the row seen so far (normalised by the running sums, reduced per tile) and records
   its maxima and log-sums. These prefix gradients are never smaller than the final ones, so a
   16-bit gradient underflows no earlier than when written once. They can be much larger,
   though: where the split's prefix holds a tiny share of the row's softmax mass (on a GPU a
   split is often a single tile) its weights are near 1 instead of near 0, and such a tile could
   overflow fp16 (65504) before the rescale brings it down. So an fp16 tile of a row that gets
   rescaled is stored times ``2**-e`` (``e >= 0`` an integer that puts its largest value under
   ``2**14``; ``e = 0`` unless it would come near the limit), and ``e`` is added to the tile's
   recorded log-norm, which the rescale divides by. A power of two changes no rounding (but for
   fp16 subnormals, values 2**27 below the tile's largest): the gradient is rounded as if the
   tile had been stored unscaled, and nothing is stored beyond the tile record. (bf16 has the
   exponent range of fp32: it cannot overflow before fp32 does.)
2. ``_merge_kernel``, one program per (layer, block of rows): merges the splits of each row into
   ``loss_b = N / sqrt(Sa * Sq)`` at the row maxima, and keeps the row statistics for step 3.
3. ``_rescale_kernel`` (gradient only, layers whose rows span several tiles): scales each tile of
   the gradient in place by ``exp((ma_t - Ma + mq_t - Mq) / 2) * sqrt(Sa_t Sq_t / (Sa Sq))``.
   Rows of a single tile already hold their final gradient.

Bytes per element (``E`` = bytes of the input dtype): the loss alone reads ``t, g, c`` (3E); loss
and gradient read them and write ``dc`` once (4E) when rows fit in one tile, plus one read and one
write of ``dc`` (6E) otherwise, for every dtype (the fp16 scale lives in the tile record: 3
accumulator words per tile, as without it). The statistics (per channel or per neuron, shared by
all rows) come from cache. Rows that start on 16 bytes use 16-byte loads and stores.

Host side, per launch group: one table built on the host and copied to the device without
blocking it (pinned memory), launched on the tensors' device (see :func:`forward`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# (BLOCK, num_warps) of the partials and rescale kernels per input dtype: 8 elements per thread,
# 16-byte loads for 16-bit inputs, no spills at sm_80 / sm_90 (see ``python -m ...kernels.aot``).
CONFIGS = {
    torch.float32: (2048, 8),
    torch.bfloat16: (2048, 8),
    torch.float16: (2048, 8),
    torch.float64: (1024, 8),
}
MERGE_ROWS, MERGE_WARPS = 256, 4
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}
# Programs per layer to aim for when splitting rows, per streaming multiprocessor (CUDA), and on
# CPU under the interpreter, where there is no device to fill.
_PROGRAMS_PER_SM, _PROGRAMS_INTERPRETER = 4, 8
# Column indices are int32 and statistic indices use _magic (exact below 2**31).
_MAX_M = 2**30


class Layer(NamedTuple):
    """One row of the int64 layer table, one row per layer of a launch group."""

    t: int  # data pointers
    c: int
    g: int
    dc: int
    mu: int
    inv_s: int
    tau_s: int
    stride_t: int  # row strides, in elements
    stride_c: int
    stride_g: int
    m: int
    rows: int
    # statistic k = (i // inner) % nstat, divisions by multiply-and-shift (see _magic)
    inner_mul: int
    inner_shift: int
    nstat: int
    nstat_mul: int
    nstat_shift: int
    nsplit: int  # splits per row, tiles per split, tiles per row
    per: int
    ntiles: int
    part_base: int  # the layer's first entry in the split-partials, per-row and tile buffers
    row_base: int
    tile_base: int
    rescale: int  # whether its gradient needs the rescale pass
    first_partial: int  # the layer's first program id in each of the three launches
    first_merge: int
    first_rescale: int


class LayerScalars(NamedTuple):
    """One row of the float layer table (accumulation dtype)."""

    loss_scale: float
    grad_scale: float
    tau: float


class _Columns(tl.constexpr):
    """Column indices of a table, by field name: ``_COL.m`` is the index of field ``m``.

    One constexpr global, so the kernels may read it: the compiler unwraps a constexpr to its
    value (a namedtuple of ints), the interpreter reads the field through ``__getattr__``.
    Both sides of the table derive from the namedtuple's fields, so its columns cannot drift.
    """

    def __getattr__(self, name):
        if name.startswith("_") or name == "value":  # copy/pickle probes, and before __init__
            raise AttributeError(name)
        return getattr(self.value, name)


_COL = _Columns(Layer(*range(len(Layer._fields))))
_FCOL = _Columns(LayerScalars(*range(len(LayerScalars._fields))))
_NCOLS = tl.constexpr(len(Layer._fields))
_NFCOLS = tl.constexpr(len(LayerScalars._fields))
_LAYER_CHUNK = tl.constexpr(64)
# The kernels keep a and q (and their maxima) multiplied by log2(e) / 2: h = exp((a - M) / 2)
# is then one exp2, and sums are normalised with log2.
_HALF_LOG2E = tl.constexpr(0.5 * math.log2(math.e))


@triton.jit
def _locate(tab, n_layers, FIRST: tl.constexpr):
    """This program's layer, and its index among the layer's programs.

    Column ``FIRST`` holds each layer's first program id (non-decreasing): the layer is the last
    one starting at or before this program, which skips layers given no programs.
    """
    pid = tl.program_id(0)
    layer = -1
    for base in range(0, n_layers, _LAYER_CHUNK):
        idx = base + tl.arange(0, _LAYER_CHUNK)
        first = tl.load(tab + idx * _NCOLS + FIRST, mask=idx < n_layers, other=0)
        layer += tl.sum(((first <= pid) & (idx < n_layers)).to(tl.int32))
    layer = layer.to(tl.int64)
    return layer, pid - tl.load(tab + layer * _NCOLS + FIRST)


@triton.jit
def _split_range(lay, j):
    """Row and tile range ``[lo, hi)`` of program ``j`` of a layer in a (row, split) launch."""
    nsplit = tl.load(lay + _COL.nsplit)
    row = j // nsplit
    per = tl.load(lay + _COL.per).to(tl.int32)
    lo = (j - row * nsplit).to(tl.int32) * per
    return row, lo, tl.minimum(lo + per, tl.load(lay + _COL.ntiles).to(tl.int32))


@triton.jit
def _row_ptr(lay, col, row, stride, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the start of ``row`` of the tensor at table column ``col``."""
    ptr = tl.load(lay + col).to(tl.pointer_type(DTYPE)) + row * stride
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _row_len(lay, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """``m``; with ALIGNED a multiple of 16 bytes, so masked tiles still use 16-byte accesses."""
    m = tl.load(lay + _COL.m).to(tl.int32)
    if ALIGNED:
        m = tl.multiple_of(m, 128 // DTYPE.primitive_bitwidth)
    return m


@triton.jit
def _udiv(n, mul, shift):
    """``n // d`` for int32 ``0 <= n < 2**31``, with uint32 ``(mul, shift) = _magic(d)``."""
    return (tl.umulhi(n.to(tl.uint32) * 2, mul) >> shift).to(tl.int32)


@triton.jit
def _partials_kernel(tab, ftab, part, tiles, n_layers, SIGNED: tl.constexpr,
                     NEED_GRAD: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Online-softmax partials of one split of one row; with NEED_GRAD, its prefix gradient.

    ALIGNED: every row of every layer starts on 16 bytes (and ``m`` is a multiple of 16 bytes).
    """
    layer, j = _locate(tab, n_layers, _COL.first_partial)
    lay = tab + layer * _NCOLS
    row, lo, hi = _split_range(lay, j)
    m = _row_len(lay, DTYPE, ALIGNED)
    t_row = _row_ptr(lay, _COL.t, row, tl.load(lay + _COL.stride_t), DTYPE, ALIGNED)
    c_row = _row_ptr(lay, _COL.c, row, tl.load(lay + _COL.stride_c), DTYPE, ALIGNED)
    g_row = _row_ptr(lay, _COL.g, row, tl.load(lay + _COL.stride_g), DTYPE, ALIGNED)
    dc_row = _row_ptr(lay, _COL.dc, row, m.to(tl.int64), DTYPE, ALIGNED)
    mu_ptr = tl.load(lay + _COL.mu).to(tl.pointer_type(ACC))
    inv_ptr = tl.load(lay + _COL.inv_s).to(tl.pointer_type(ACC))
    taus_ptr = tl.load(lay + _COL.tau_s).to(tl.pointer_type(ACC))
    inner_mul = tl.load(lay + _COL.inner_mul).to(tl.uint32)
    inner_shift = tl.load(lay + _COL.inner_shift).to(tl.uint32)
    nstat_mul = tl.load(lay + _COL.nstat_mul).to(tl.uint32)
    nstat_shift = tl.load(lay + _COL.nstat_shift).to(tl.uint32)
    nstat = tl.load(lay + _COL.nstat).to(tl.int32)
    tile_rec = tiles + (tl.load(lay + _COL.tile_base) + row * tl.load(lay + _COL.ntiles)) * 3
    rescale = tl.load(lay + _COL.rescale) != 0
    tau = tl.load(ftab + layer * _NFCOLS + _FCOL.tau)
    grad_scale = tl.load(ftab + layer * _NFCOLS + _FCOL.grad_scale)

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
        ch = _udiv(i, inner_mul, inner_shift)
        k = ch - nstat * _udiv(ch, nstat_mul, nstat_shift)
        t = tl.load(t_row + i, mask=mask, other=0.0).to(ACC)
        c = tl.load(c_row + i, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_row + i, mask=mask, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + k, mask=mask, other=0.0)
        inv = tl.load(inv_ptr + k, mask=mask, other=0.0)
        tau_s = tl.load(taus_ptr + k, mask=mask, other=0.0)
        z = (t - mu) * inv
        if not SIGNED:
            z = tl.abs(z)
        a = tl.where(mask, tau * z, float("-inf"))
        q = tl.where(mask, tau_s * g * _HALF_LOG2E, float("-inf"))
        r = (t - c) * inv
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
            d = grad_scale / tl.sqrt(ss) * w * r * inv
            if rescale:
                log_norm = 0.5 * tl.log2(ss)
                if DTYPE == tl.float16:
                    # Keep the provisional tile below fp16's overflow: store it times 2**-e,
                    # e >= 0 an integer putting its largest value under 2**14 (2**15 if log2 is
                    # off by one), and fold e into the tile's log-norm, which the rescale
                    # divides by. A power of two: values are rounded as if stored unscaled.
                    top = tl.maximum(tl.max(tl.abs(d), 0), 1.0)
                    e = tl.maximum(tl.floor(tl.log2(top)) - 13.0, 0.0)
                    d = d * tl.exp2(-e)
                    log_norm = log_norm + e
                rec = tile_rec + tile * 3
                tl.store(rec, ma)
                tl.store(rec + 1, mq)
                tl.store(rec + 2, log_norm)
            tl.store(dc_row + i, d.to(DTYPE), mask=mask)

    rec = part + (tl.load(lay + _COL.part_base) + j) * 5
    tl.store(rec, ma)
    tl.store(rec + 1, tl.sum(sa, 0))
    tl.store(rec + 2, mq)
    tl.store(rec + 3, tl.sum(sq, 0))
    tl.store(rec + 4, tl.sum(num, 0))


@triton.jit
def _merge_kernel(tab, ftab, part, loss, rowstat, n_layers, ACC: tl.constexpr, ROWS: tl.constexpr):
    """Per-row loss (times the loss scale) from the split partials; row statistics for rescaling."""
    layer, j = _locate(tab, n_layers, _COL.first_merge)
    lay = tab + layer * _NCOLS
    b = j * ROWS + tl.arange(0, ROWS)
    mask = b < tl.load(lay + _COL.rows)
    nsplit = tl.load(lay + _COL.nsplit)
    rec = part + (tl.load(lay + _COL.part_base) + b * nsplit) * 5
    ma = tl.full((ROWS,), float("-inf"), ACC)
    mq = tl.full((ROWS,), float("-inf"), ACC)
    sa = tl.zeros((ROWS,), ACC)
    sq = tl.zeros((ROWS,), ACC)
    num = tl.zeros((ROWS,), ACC)
    for s in range(nsplit):
        p = rec + s * 5
        ma_s = tl.load(p, mask=mask, other=0.0)
        mq_s = tl.load(p + 2, mask=mask, other=0.0)
        ma_new = tl.maximum(ma, ma_s)
        mq_new = tl.maximum(mq, mq_s)
        ea, fa = tl.exp2(ma - ma_new), tl.exp2(ma_s - ma_new)
        eq, fq = tl.exp2(mq - mq_new), tl.exp2(mq_s - mq_new)
        sa = sa * (ea * ea) + tl.load(p + 1, mask=mask, other=1.0) * (fa * fa)
        sq = sq * (eq * eq) + tl.load(p + 3, mask=mask, other=1.0) * (fq * fq)
        num = num * (ea * eq) + tl.load(p + 4, mask=mask, other=0.0) * (fa * fq)
        ma, mq = ma_new, mq_new
    ss = sa * sq
    out = tl.load(lay + _COL.row_base) + b
    scale = tl.load(ftab + layer * _NFCOLS + _FCOL.loss_scale)
    tl.store(loss + out, num / tl.sqrt(ss) * scale, mask=mask)
    if tl.load(lay + _COL.rescale) != 0:
        tl.store(rowstat + out * 3, ma, mask=mask)
        tl.store(rowstat + out * 3 + 1, mq, mask=mask)
        tl.store(rowstat + out * 3 + 2, 0.5 * tl.log2(ss), mask=mask)


@triton.jit
def _rescale_kernel(tab, rowstat, tiles, n_layers, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Scale each gradient tile from the weights its partials saw to the weights of the row."""
    layer, j = _locate(tab, n_layers, _COL.first_rescale)
    lay = tab + layer * _NCOLS
    row, lo, hi = _split_range(lay, j)
    stat = rowstat + (tl.load(lay + _COL.row_base) + row) * 3
    ma, mq, ls = tl.load(stat), tl.load(stat + 1), tl.load(stat + 2)
    m = _row_len(lay, DTYPE, ALIGNED)
    dc_row = _row_ptr(lay, _COL.dc, row, m.to(tl.int64), DTYPE, ALIGNED)
    tile_rec = tiles + (tl.load(lay + _COL.tile_base) + row * tl.load(lay + _COL.ntiles)) * 3
    for tile in range(lo, hi):
        rec = tile_rec + tile * 3
        f = tl.exp2((tl.load(rec) - ma) + (tl.load(rec + 1) - mq) + (tl.load(rec + 2) - ls))
        i = tile * BLOCK + tl.arange(0, BLOCK)
        mask = i < m
        d = tl.load(dc_row + i, mask=mask, other=0.0).to(ACC)
        tl.store(dc_row + i, (d * f).to(DTYPE), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _magic(d: int) -> tuple[int, int]:
    """``(mul, shift)`` with ``mul < 2**32`` and ``n // d == umulhi(2n, mul) >> shift``, n < 2**31.

    Granlund & Montgomery (1994), Thm 4.2 with N = 31: ``n // d == (n * mul) >> (31 + shift)``;
    the kernels thus divide with one 32-bit multiply-high instead of an integer division.
    """
    ell = (d - 1).bit_length()
    return (1 << (31 + ell)) // d + 1, ell


def _splits(rows: int, ntiles: int, target: int) -> tuple[int, int]:
    """``(splits per row, tiles per split)``: about ``target`` programs for a layer, none empty."""
    per = triton.cdiv(ntiles, max(1, min(ntiles, target // rows)))
    return triton.cdiv(ntiles, per), per


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _PROGRAMS_INTERPRETER
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aligned(t: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> bool:
    """Every row of ``t, c, g`` and of the new gradient starts on 16 bytes."""
    size = t.element_size()
    return (t.shape[1] * size) % 16 == 0 and all(
        x.data_ptr() % 16 == 0 and (x.stride(0) * size) % 16 == 0 for x in (t, c, g))


def _upload(tab: list[Layer], ftab: list[LayerScalars], acc: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int64 and float layer tables on ``device``, in one copy that does not block the host.

    Both go into one host buffer (the float rows as the bytes of int64 words); for CUDA it is
    pinned and copied with ``non_blocking=True``: the CPU runs on while the copy is queued on the
    current stream, ahead of the launches that read it (torch's pinned-memory allocator keeps the
    buffer until the copy has run). This copy is why the op refuses CUDA-graph capture (see
    :func:`forward`).
    """
    n = len(tab) * len(Layer._fields)
    start = n + n % 2  # the float rows start on 16 bytes, as the kernels are compiled for
    words = -(-len(ftab) * len(LayerScalars._fields) * acc.itemsize // 8)
    cuda = device.type == "cuda"
    host = torch.empty(start + words, dtype=torch.int64, pin_memory=cuda)
    host[:n] = torch.tensor(tab, dtype=torch.int64).view(-1)
    floats = torch.tensor(ftab, dtype=acc).view(-1)
    host[start:].view(acc)[:floats.numel()] = floats
    table = host.to(device, non_blocking=True) if cuda else host
    return table[:n], table[start:].view(acc)


def _launch_group(idx, aligned, t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale,
                  reduce_rows, dc):
    """Run the layers ``idx`` (one dtype and alignment); return their per-row losses."""
    dtype, device = t[idx[0]].dtype, t[idx[0]].device
    acc = _acc(dtype)
    block, warps = CONFIGS[dtype]
    target = _target_programs(device)
    need_grad = bool(dc)
    tab, ftab = [], []
    n_part = n_row = n_tile = 0
    first = [0, 0, 0]
    for li in idx:
        rows, m = t[li].shape
        if m > _MAX_M:
            raise ValueError(f"rows of more than {_MAX_M} neurons are not supported "
                             f"(layer {li} has {m})")
        ntiles = triton.cdiv(m, block)
        nsplit, per = _splits(rows, ntiles, target)
        rescale = need_grad and ntiles > 1
        nstat = mu[li].numel()
        inner_mul, inner_shift = _magic(inner[li])
        nstat_mul, nstat_shift = _magic(nstat)
        tab.append(Layer(
            t=t[li].data_ptr(), c=c[li].data_ptr(), g=g[li].data_ptr(),
            dc=dc[li].data_ptr() if dc else 0, mu=mu[li].data_ptr(), inv_s=inv_s[li].data_ptr(),
            tau_s=tau_s[li].data_ptr(), stride_t=t[li].stride(0), stride_c=c[li].stride(0),
            stride_g=g[li].stride(0), m=m, rows=rows, inner_mul=inner_mul, inner_shift=inner_shift,
            nstat=nstat, nstat_mul=nstat_mul, nstat_shift=nstat_shift, nsplit=nsplit, per=per,
            ntiles=ntiles, part_base=n_part, row_base=n_row, tile_base=n_tile,
            rescale=int(rescale), first_partial=first[0], first_merge=first[1],
            first_rescale=first[2]))
        ftab.append(LayerScalars(loss_scale=row_scale[li] if reduce_rows else 1.0,
                                 grad_scale=-2.0 * row_scale[li], tau=tau * _HALF_LOG2E.value))
        n_part += rows * nsplit
        n_row += rows
        n_tile += rows * ntiles if rescale else 0
        programs = (rows * nsplit, triton.cdiv(rows, MERGE_ROWS), rows * nsplit if rescale else 0)
        first = [f + p for f, p in zip(first, programs)]
    tab, ftab = _upload(tab, ftab, acc, device)
    part = torch.empty(n_part * 5, dtype=acc, device=device)
    loss = torch.empty(n_row, dtype=acc, device=device)
    rowstat = torch.empty(max(n_row * 3 if n_tile else 0, 1), dtype=acc, device=device)
    tiles = torch.empty(max(n_tile * 3, 1), dtype=acc, device=device)
    tile_args = dict(DTYPE=TL_DTYPES[dtype], ACC=TL_DTYPES[acc], BLOCK=block, ALIGNED=aligned,
                     num_warps=warps)
    _partials_kernel[(first[0],)](tab, ftab, part, tiles, len(idx), SIGNED=signed,
                                  NEED_GRAD=need_grad, **tile_args)
    _merge_kernel[(first[1],)](tab, ftab, part, loss, rowstat, len(idx), ACC=TL_DTYPES[acc],
                               ROWS=MERGE_ROWS, num_warps=MERGE_WARPS)
    if first[2]:
        _rescale_kernel[(first[2],)](tab, rowstat, tiles, len(idx), **tile_args)
    return loss


def forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows, need_grad):
    """The op's contract (:func:`medic_fast.ops.importance_clone._fused_loss`) on Triton.

    Per layer ``t, c, g`` are ``[rows, m]`` with unit stride along ``m`` (any row stride, even 0);
    ``mu, inv_s, tau_s`` are contiguous vectors in the accumulation dtype. Returns the loss (a
    scalar ``sum_l row_scale[l] * sum_b loss_lb`` when ``reduce_rows``, else ``sum_l loss_lb`` per
    row) and, when ``need_grad``, ``row_scale[l] * d loss_l / d c[l]`` per layer (else ``[]``).
    One grouped launch per stage for the layers of each (dtype, alignment).

    Every tensor is on one device (the op's validation sees to it). Triton launches on the current
    CUDA device and its current stream, so the launches run with the tensors' device made current.
    Not capturable in a CUDA graph: each call copies its layer tables from (pinned) host memory,
    which a replayed graph would read again, stale; capture raises instead. (The op is tagged
    ``cudagraph_unsafe``, so ``torch.compile(mode="reduce-overhead")`` leaves it out of its graphs.)
    """
    device = t[0].device
    if device.type != "cuda":
        return _forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows,
                        need_grad)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("medic_fast::importance_clone_loss cannot be captured in a CUDA graph: "
                           "each call copies its launch tables from host memory, which a replay "
                           "would not refresh. Run it outside the captured region (torch.compile "
                           "with mode='reduce-overhead' does so by itself).")
    with torch.cuda.device(device):
        return _forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows,
                        need_grad)


def _forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows, need_grad):
    dc = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in c] if need_grad else []
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    for li, x in enumerate(t):
        groups.setdefault((x.dtype, _aligned(x, c[li], g[li])), []).append(li)
    acc = _acc(t[0].dtype)
    losses = [_launch_group(idx, aligned, t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale,
                            reduce_rows, dc)
              for (_, aligned), idx in groups.items()]
    loss = losses[0].to(acc) if len(losses) == 1 else torch.cat([x.to(acc) for x in losses])
    return (loss.sum() if reduce_rows else loss.view(-1, t[0].shape[0]).sum(0)), dc


def aot_variants():
    """Every specialisation :func:`forward` launches, for ``python -m medic_fast.kernels.aot``.

    Yields ``(kernel, signature, constexprs, num_warps, name)``.
    """
    for dtype, (block, warps) in CONFIGS.items():
        dt, acc = TL_DTYPES[dtype], TL_DTYPES[_acc(dtype)]
        buf = f"*{acc.name}"
        for aligned in (False, True):
            tile = dict(DTYPE=dt, ACC=acc, BLOCK=block, ALIGNED=aligned)
            name = f"{dt.name} BLOCK={block}{' aligned' if aligned else ''}"
            for signed in (False, True):
                for need_grad in (False, True):
                    yield (_partials_kernel,
                           dict(tab="*i64", ftab=buf, part=buf, tiles=buf, n_layers="i32"),
                           dict(SIGNED=signed, NEED_GRAD=need_grad, **tile), warps,
                           f"{name} {'signed' if signed else 'abs'}{' grad' if need_grad else ''}")
            yield (_rescale_kernel, dict(tab="*i64", rowstat=buf, tiles=buf, n_layers="i32"), tile,
                   warps, name)
    for acc in (tl.float32, tl.float64):
        buf = f"*{acc.name}"
        yield (_merge_kernel,
               dict(tab="*i64", ftab=buf, part=buf, loss=buf, rowstat=buf, n_layers="i32"),
               dict(ACC=acc, ROWS=MERGE_ROWS), MERGE_WARPS, f"{acc.name} ROWS={MERGE_ROWS}")
