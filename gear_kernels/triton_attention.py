"""Triton decode attention over one layer's KVStore, beside attention_reference.py.

Computes what `attention_reference.decode_attention_torch` computes, reading the store's packed
fields directly: the full-precision K/V of the compressed tokens is never built (one tile of
BLOCK_N tokens lives in registers at a time).

The store is varlen (store.py): segments, each a run of one row's tokens, every stored field
one (H, entries) tensor. The kernel takes it as two small tables instead of a pointer per
tensor: `fields` (side, pointer / head stride, slot) of every stored field (SLOTS, derived from
the quantizer's and the corrections' fields tables), and `segments`, a row per segment (its
batch row, tokens, and per side its token group, rank and each field's offset). Two launches
a call, whatever the batch, its padding and the number of chunks held:

1. `_attend_kernel`, grid (work items, kv heads x query-row blocks). A work item is a run of
   tokens of one segment, or of the exact buffer (the store's sinks first), of one row
   (flash-decoding splits; left padding is never stored, so it costs nothing). All query heads
   of a GQA group, times all q_len queries, are the rows of one program, so a K/V tile is read
   once per kv head and never repeated. Everything is held transposed (tokens or channels x
   query rows) so that the tensor-core M dimension is the tile's tokens or channels. A tile:
   - dequantize K by the quantizer's own Triton function (its `triton_spec`: e.g.
     quantizers/uniform.py's dequant_tile), keys and values each with their own quantizer;
   - scores^T = K q^T on the tensor cores in the model's dtype with fp32 accumulation (as the
     rebuild rounds K to the model dtype); fp32 models use ieee fp32;
   - low rank: + A (q B)^T, with (q B)^T (r x rows) computed once a segment: rank-r work per
     token, never A B^T (int8 factors scaled by their column scales as they are loaded);
   - key outliers: an outlier at (t, d) adds q[d] * (S - D[t,d] - L[t,d]) to the score of token
     t; each segment's outliers are sorted and bucketed by BUCKET tokens, so a tile reads its own
     between two offsets, BLOCK_O at a time; corrections land on the score columns by a one-hot
     product (exact: one nonzero a sum);
   - the online softmax in base 2 (`_softmax_step`, shared with the buffer's tiles);
   - values: acc^T += V^T P^T; low rank accumulated as (P A)^T, rescaled with acc, times B at
     the segment's end; value outliers add P[:, t] * (S - D - L) to channel d.
2. `_merge_kernel`, one program per (row x kv head, query-row block): merges the row's work
   items (cu_work, as flash-attn's cu_seqlens) by the log-sum-exp rule, writes q's dtype.

Preconditions (checked in `decode_attention_triton` through check_decode_inputs and its own
asserts): tensors on q's device (CUDA, or CPU under TRITON_INTERPRET=1); for q_len > 1, the
queries' own tokens in the buffer; each segment's outliers sorted (checked on CPU, and on CUDA
when CHECK_OUTLIER_ORDER is set, since the check costs a device sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import triton_device as td
from .attention_reference import DecodeProblem, check_decode_inputs, sinks_before_buffer
from .corrections import lowrank, outliers
from .corrections.outliers import BUCKET
from .store import KVStore, Packed, _exclusive
from .triton_device import pow2 as _pow2

LOG2E = 1.4426950408889634
POISON = False  # tests: fill scratch buffers with NaN, so that an unwritten element shows
CHECK_OUTLIER_ORDER = False  # also check the outliers' order on CUDA (a device sync per call)

# GPU sizes (the interpreter uses 64-token tiles and 64-outlier blocks): tokens per tile,
# outliers per block, warps per program, and how many programs a launch aims for per SM (more
# programs hide more memory latency, at the cost of more partial states to merge)
TUNING = {"block_n": 64, "block_o": 32, "num_warps": 4, "num_stages": 1, "programs_per_sm": 4}

# The field in each slot of the kernel's tables: the quantizer's (up to QUANT_SLOTS, in its
# fields table's order), then the corrections' (their tables' order).
QUANT_SLOTS = 3
SLOTS = (*(f"quantizer{i}" for i in range(QUANT_SLOTS)), *(f.name for f in lowrank.FIELDS),
         *(f.name for f in outliers.FIELDS))
A, B, A_SCALE, B_SCALE, OUT_VAL, OUT_IDX, OUT_BKT = range(QUANT_SLOTS, len(SLOTS))
SIDE = 2 + len(SLOTS)  # per side in a segment row: token group, rank, an offset a slot
N_SLOTS = tl.constexpr(len(SLOTS))


@triton.jit
def _field(fields, seg, side: tl.constexpr, slot: tl.constexpr, h, DT: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Pointer to head h's entries of field `slot` of one side, at segment `seg`'s first; ALIGN:
    bytes the host found to divide it (a pointer read from a table carries no alignment, and
    without it the tile's loads are not vectorized)."""
    base = tl.load(fields + (side * 2) * N_SLOTS + slot).to(tl.pointer_type(DT))
    head_stride = tl.load(fields + (side * 2 + 1) * N_SLOTS + slot)
    return tl.multiple_of(base + h * head_stride + tl.load(seg + 2 + side * (2 + N_SLOTS) + 2 + slot), ALIGN)


@triton.jit
def _softmax_step(s, m_i, l_i, acc):
    """One tile of the online softmax (base 2): scores^T s (BLOCK_N, ROWS), -inf where masked ->
    probabilities p, the new running max and sum, acc rescaled (acc * alpha)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[None, :])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha[None, :]


@triton.jit
def _outlier_block(idx_ptr, val_ptr, o0, o_end, q0, q1, q2, a_ptr, b_ptr, as_ptr, bs_ptr, D, W, GW, G, R,
                   ENTRY: tl.constexpr, BITS: tl.constexpr, PW: tl.constexpr, LAYOUT: tl.constexpr,
                   HAS_LR: tl.constexpr, LR_Q: tl.constexpr, BLOCK_O: tl.constexpr, R_G: tl.constexpr):
    """Outliers [o0, min(o0 + BLOCK_O, o_end)) of a segment: their token, channel, correction
    S - D - L (0 where not taken) and the taken mask."""
    o = o0 + tl.arange(0, BLOCK_O)
    ok = o < o_end
    idx = tl.load(idx_ptr + o, mask=ok, other=0).to(tl.int32)
    t = idx // D
    d = idx % D
    approx = ENTRY(q0, q1, q2, t, d, ok, W, GW, G, BITS, PW, LAYOUT)
    if HAS_LR:
        r = tl.arange(0, R_G)
        rm = ok[:, None] & (r < R)[None, :]
        a = tl.load(a_ptr + t[:, None] * R + r[None, :], mask=rm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d[:, None] * R + r[None, :], mask=rm, other=0.0).to(tl.float32)
        if LR_Q:
            a = a * tl.load(as_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
            b = b * tl.load(bs_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
        approx += tl.sum(a * b, axis=1)
    exact = tl.load(val_ptr + o, mask=ok, other=0.0).to(tl.float32)
    return t, d, tl.where(ok, exact - approx, 0.0), ok


@triton.jit
def _attend_segment(
    m_i, l_i, acc, q_t, q_ptr, q_off, row_ok, t_lo, t_hi, fields, seg, h, D, scale_log2,
    K_TILE: tl.constexpr, K_ENTRY: tl.constexpr, K_T1: tl.constexpr, K_T2: tl.constexpr, K_BITS: tl.constexpr,
    K_PW: tl.constexpr, K_LAYOUT: tl.constexpr, K_MODE: tl.constexpr, K_ALIGN: tl.constexpr, K_W, K_GW, K_CG,
    V_TILE: tl.constexpr, V_ENTRY: tl.constexpr, V_T1: tl.constexpr, V_T2: tl.constexpr, V_BITS: tl.constexpr,
    V_PW: tl.constexpr, V_LAYOUT: tl.constexpr, V_MODE: tl.constexpr, V_ALIGN: tl.constexpr, V_W, V_GW, V_CG,
    HAS_LR: tl.constexpr, LR_T: tl.constexpr, LR_Q: tl.constexpr, HAS_OUT: tl.constexpr, IDX_T: tl.constexpr,
    VAL_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, R_P: tl.constexpr,
    R_G: tl.constexpr, BLOCK_O: tl.constexpr, BUCKET: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """Online-softmax state (m_i, l_i, acc^T) after tokens [t_lo, t_hi) of segment `seg`."""
    kq0 = _field(fields, seg, 0, 0, h, tl.uint8, K_ALIGN)  # the codes
    kq1 = _field(fields, seg, 0, 1, h, K_T1)
    kq2 = _field(fields, seg, 0, 2, h, K_T2)
    vq0 = _field(fields, seg, 1, 0, h, tl.uint8, V_ALIGN)
    vq1 = _field(fields, seg, 1, 1, h, V_T1)
    vq2 = _field(fields, seg, 1, 2, h, V_T2)
    # a token group of each side (per-channel groups: this segment's; else the channel group)
    k_g = tl.load(seg + 2) if K_LAYOUT else K_CG
    v_g = tl.load(seg + 2 + 2 + N_SLOTS) if V_LAYOUT else V_CG
    k_r = tl.load(seg + 3)
    v_r = tl.load(seg + 3 + 2 + N_SLOTS)
    d = tl.arange(0, D_P)
    d_ok = d < D
    r = tl.arange(0, R_P)  # rank, padded to a tensor-core width
    cols = tl.arange(0, BLOCK_N)
    if HAS_LR:
        ka = _field(fields, seg, 0, 3, h, LR_T)
        kb = _field(fields, seg, 0, 4, h, LR_T)
        kas = _field(fields, seg, 0, 5, h, tl.float16)
        kbs = _field(fields, seg, 0, 6, h, tl.float16)
        va = _field(fields, seg, 1, 3, h, LR_T)
        vb = _field(fields, seg, 1, 4, h, LR_T)
        vas = _field(fields, seg, 1, 5, h, tl.float16)
        vbs = _field(fields, seg, 1, 6, h, tl.float16)
        bk_t = tl.load(kb + d[None, :] * k_r + r[:, None], mask=d_ok[None, :] & (r < k_r)[:, None],
                       other=0.0).to(tl.float32)  # B^T (R_P, D_P)
        if LR_Q:
            bk_t = bk_t * tl.load(kbs + r, mask=r < k_r, other=0.0).to(tl.float32)[:, None]
            ka_s = tl.load(kas + r, mask=r < k_r, other=0.0).to(tl.float32)  # (R_P,)
            va_s = tl.load(vas + r, mask=r < v_r, other=0.0).to(tl.float32)
        qb_t = tl.dot(bk_t, q_t.to(tl.float32), input_precision=PREC)  # (q B)^T (R_P, ROWS), once a segment
        acc_a = tl.zeros((R_P, ROWS), tl.float32)  # (P A)^T, rescaled with acc
    else:  # never read
        ka = kq0
        kb = kq0
        kas = kq0
        kbs = kq0
        va = kq0
        vb = kq0
        vas = kq0
        vbs = kq0
    if HAS_OUT:
        kov = _field(fields, seg, 0, 7, h, VAL_T)
        koi = _field(fields, seg, 0, 8, h, IDX_T)
        kbk = _field(fields, seg, 0, 9, h, tl.int32)
        vov = _field(fields, seg, 1, 7, h, VAL_T)
        voi = _field(fields, seg, 1, 8, h, IDX_T)
        vbk = _field(fields, seg, 1, 9, h, tl.int32)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        tok = t0 + cols
        t_ok = tok < t_hi
        t_end = tl.minimum(t0 + BLOCK_N, t_hi)
        # ---- scores^T (BLOCK_N, ROWS)
        k = K_TILE(kq0, kq1, kq2, t0, t_hi, D, K_W, K_GW, k_g, K_BITS, K_PW, K_LAYOUT, K_MODE, BLOCK_N, D_P)
        s = tl.dot(k.to(DOT), q_t, input_precision=PREC)  # fp32 accumulation
        if HAS_LR:
            a = tl.load(ka + tok[:, None] * k_r + r[None, :], mask=t_ok[:, None] & (r < k_r)[None, :],
                        other=0.0).to(tl.float32)  # A tile (BLOCK_N, R_P)
            if LR_Q:
                a = a * ka_s[None, :]
            s += tl.dot(a, qb_t, input_precision=PREC)  # A (q B)^T: the rank-r part, never A B^T
        if HAS_OUT:
            o_lo = tl.load(kbk + t0 // BUCKET)
            o_hi = tl.load(kbk + (t_end + BUCKET - 1) // BUCKET)
            for o0 in range(o_lo, o_hi, BLOCK_O):
                ot, od, delta, ook = _outlier_block(koi, kov, o0, o_hi, kq0, kq1, kq2, ka, kb, kas, kbs, D, K_W, K_GW,
                                                    k_g, k_r, K_ENTRY, K_BITS, K_PW, K_LAYOUT, HAS_LR, LR_Q,
                                                    BLOCK_O, R_G)
                qd = tl.load(q_ptr + q_off[None, :] + od[:, None], mask=ook[:, None] & row_ok[None, :],
                             other=0.0).to(tl.float32)  # q[row, d] of each outlier (BLOCK_O, ROWS)
                onehot = (cols[:, None] == (ot - t0)[None, :]) & ook[None, :]  # (BLOCK_N, BLOCK_O)
                s += tl.dot(onehot.to(tl.float32), qd * delta[:, None], input_precision=PREC)
        s = tl.where(t_ok[:, None] & row_ok[None, :], s * scale_log2, float("-inf"))
        p, alpha, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        # ---- values: acc^T += V^T P^T
        v = V_TILE(vq0, vq1, vq2, t0, t_hi, D, V_W, V_GW, v_g, V_BITS, V_PW, V_LAYOUT, V_MODE, BLOCK_N, D_P)
        p_dot = p.to(DOT)
        acc += tl.dot(tl.trans(v.to(DOT)), p_dot, input_precision=PREC)
        if HAS_LR:
            a_t = tl.load(va + tok[None, :] * v_r + r[:, None], mask=t_ok[None, :] & (r < v_r)[:, None],
                          other=0.0)  # A^T tile (R_P, BLOCK_N)
            if LR_Q:
                a_t = a_t.to(tl.float32) * va_s[:, None]
            acc_a = acc_a * alpha[None, :] + tl.dot(a_t.to(DOT), p_dot, input_precision=PREC)
        if HAS_OUT:
            o_lo = tl.load(vbk + t0 // BUCKET)
            o_hi = tl.load(vbk + (t_end + BUCKET - 1) // BUCKET)
            for o0 in range(o_lo, o_hi, BLOCK_O):
                ot, od, delta, ook = _outlier_block(voi, vov, o0, o_hi, vq0, vq1, vq2, va, vb, vas, vbs, D, V_W, V_GW,
                                                    v_g, v_r, V_ENTRY, V_BITS, V_PW, V_LAYOUT, HAS_LR, LR_Q,
                                                    BLOCK_O, R_G)
                pick = ((ot - t0)[:, None] == cols[None, :]) & ook[:, None]  # (BLOCK_O, BLOCK_N)
                pt = tl.dot(pick.to(tl.float32), p, input_precision=PREC)  # P[t of each outlier] (BLOCK_O, ROWS)
                put = (d[:, None] == od[None, :]) & ook[None, :]  # (D_P, BLOCK_O)
                acc += tl.dot(put.to(tl.float32), pt * delta[:, None], input_precision=PREC)
    if HAS_LR:
        bv = tl.load(vb + d[:, None] * v_r + r[None, :], mask=d_ok[:, None] & (r < v_r)[None, :],
                     other=0.0).to(tl.float32)  # B (D_P, R_P)
        if LR_Q:
            bv = bv * tl.load(vbs + r, mask=r < v_r, other=0.0).to(tl.float32)[None, :]
        acc += tl.dot(bv, acc_a, input_precision=PREC)  # ((P A) B^T)^T
    return m_i, l_i, acc


@triton.jit
def _attend_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr, work, segments, fields, kbuf, vbuf, b_lead,
    NBUF, D, H, QL, RATIO, M, NRB, scale_log2, K_W, K_GW, K_CG, V_W, V_GW, V_CG,
    K_TILE: tl.constexpr, K_ENTRY: tl.constexpr, K_T1: tl.constexpr, K_T2: tl.constexpr, K_BITS: tl.constexpr,
    K_PW: tl.constexpr, K_LAYOUT: tl.constexpr, K_MODE: tl.constexpr, K_ALIGN: tl.constexpr,
    V_TILE: tl.constexpr, V_ENTRY: tl.constexpr, V_T1: tl.constexpr, V_T2: tl.constexpr, V_BITS: tl.constexpr,
    V_PW: tl.constexpr, V_LAYOUT: tl.constexpr, V_MODE: tl.constexpr, V_ALIGN: tl.constexpr,
    HAS_LR: tl.constexpr, LR_T: tl.constexpr, LR_Q: tl.constexpr, HAS_OUT: tl.constexpr, IDX_T: tl.constexpr,
    VAL_T: tl.constexpr, CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr,
    R_P: tl.constexpr, R_G: tl.constexpr, BLOCK_O: tl.constexpr, BUCKET: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    item = tl.program_id(0)
    pid_1 = tl.program_id(1)
    h = pid_1 // NRB
    rb = pid_1 % NRB
    b = tl.load(work + item * 4)  # this item's row, segment (-1: the buffer) and token range
    segment = tl.load(work + item * 4 + 1)
    t_lo = tl.load(work + item * 4 + 2)
    t_hi = tl.load(work + item * 4 + 3)

    rows = rb * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    qi = rows % QL  # query index of each row; rows // QL is the member of the GQA group
    d = tl.arange(0, D_P)
    d_ok = d < D
    q_off = ((b * H + h) * RATIO * QL + rows) * D
    q_t = tl.load(q_ptr + q_off[None, :] + d[:, None], mask=d_ok[:, None] & row_ok[None, :],
                  other=0.0).to(DOT)  # (D_P, ROWS)

    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((D_P, ROWS), tl.float32)  # output^T
    if segment >= 0:
        m_i, l_i, acc = _attend_segment(
            m_i, l_i, acc, q_t, q_ptr, q_off, row_ok, t_lo, t_hi, fields, segments + segment * (2 + 2 * (2 + N_SLOTS)),
            h.to(tl.int64), D, scale_log2,
            K_TILE, K_ENTRY, K_T1, K_T2, K_BITS, K_PW, K_LAYOUT, K_MODE, K_ALIGN, K_W, K_GW, K_CG,
            V_TILE, V_ENTRY, V_T1, V_T2, V_BITS, V_PW, V_LAYOUT, V_MODE, V_ALIGN, V_W, V_GW, V_CG,
            HAS_LR, LR_T, LR_Q, HAS_OUT, IDX_T, VAL_T, ROWS, BLOCK_N, D_P, R_P, R_G, BLOCK_O, BUCKET, DOT, PREC,
        )
    else:  # the exact buffer (B, H, NBUF, D), contiguous; row b's starts at its b_lead[b]
        cols = tl.arange(0, BLOCK_N)
        lead = tl.load(b_lead + b)
        t_hi = tl.minimum(t_hi, NBUF)  # the work list's last split of the buffer may run past it
        base = (b * H + h) * NBUF * D
        for t0 in range(t_lo, t_hi, BLOCK_N):
            tok = t0 + cols
            t_ok = (tok < t_hi) & (tok >= lead)
            kv_ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(kbuf + base + tok[:, None] * D + d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(k.to(DOT), q_t, input_precision=PREC)
            valid = t_ok[:, None] & row_ok[None, :]
            if CAUSAL:  # query i is the buffer's token NBUF - QL + i
                valid = valid & (tok[:, None] <= (NBUF - QL + qi)[None, :])
            s = tl.where(valid, s * scale_log2, float("-inf"))
            p, alpha, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
            v = tl.load(vbuf + base + tok[:, None] * D + d[None, :], mask=kv_ok, other=0.0)
            acc += tl.dot(tl.trans(v.to(DOT)), p.to(DOT), input_precision=PREC)

    out = (item * H + h) * NRB * ROWS + rows  # every program writes its slot
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[None, :] * D_P + d[:, None], acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, cu_work, D, H, QL, RATIO, M, NRB,
                  ROWS: tl.constexpr, D_P: tl.constexpr):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = rb * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_P)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D_P), tl.float32)
    for j in range(tl.load(cu_work + b), tl.load(cu_work + b + 1)):
        slot = (j * H + h) * NRB * ROWS + rows
        m_s = tl.load(m_ptr + slot)
        l_s = tl.load(l_ptr + slot)
        a_s = tl.load(acc_ptr + slot[:, None] * D_P + d[None, :])
        live = l_s != 0  # an item with nothing visible adds nothing; NaN propagates
        m_s = tl.where(live, m_s, float("-inf"))
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        beta = tl.math.exp2(m_s - m_use)
        l_i = l_i * alpha + tl.where(live, l_s, 0.0) * beta
        acc = acc * alpha[:, None] + beta[:, None] * tl.where(live[:, None], a_s, 0.0)
        m_i = m_new
    row_ok = rows < M
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # padding rows: no 0 / 0
    o_off = ((b.to(tl.int64) * H + h) * RATIO * QL + rows) * D
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < D)[None, :])


# ------------------------------------------------------------------------------ host side

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.uint8: tl.uint8,
             torch.int8: tl.int8, torch.uint16: tl.uint16, torch.int16: tl.int16, torch.int32: tl.int32,
             torch.int64: tl.int64}


def _slot_names(side: Packed) -> list[str | None]:
    """The field in each of SLOTS for this side (None: not stored)."""
    quant = [f.name for f in side.quantizer.fields] + [None] * (QUANT_SLOTS - len(side.quantizer.fields))
    return [*quant, *(n if n in side.data else None for n in SLOTS[QUANT_SLOTS:])]


def _tables(keys: Packed, values: Packed, consts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """fields (2, 2, N_SLOTS) int64: each side's field pointers and head strides (a quantizer's
    constant tensor, if any, in its first free slot, stride 0); segments (S, 2 + 2 * SIDE):
    row, tokens, then per side token group, rank and each slot's offset. On the CPU."""
    fields = torch.zeros(2, 2, len(SLOTS), dtype=torch.int64)
    segments = torch.zeros(keys.segments, 2 + 2 * SIDE, dtype=torch.int64)
    segments[:, 0], segments[:, 1] = keys.rows, keys.tokens
    for i, (side, const) in enumerate(zip((keys, values), consts)):
        col = 2 + i * SIDE
        segments[:, col] = side.groups
        if "lowrank_a" in side.data:
            segments[:, col + 1] = side.counts["lowrank_a"] // side.tokens
        for slot, name in enumerate(_slot_names(side)):
            if name is not None:
                fields[i, 0, slot], fields[i, 1, slot] = side.data[name].data_ptr(), side.data[name].stride(0)
                segments[:, col + 2 + slot] = side.offsets[name]
            elif const is not None and slot < QUANT_SLOTS:
                fields[i, 0, slot], const = const.data_ptr(), None
    return fields, segments


def _work(rows: torch.Tensor, tokens: torch.Tensor, batch: int, buffer_pieces: int, split: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Work items (n, 4) int64: row, segment (-1: the buffer), first and end token (the kernel
    stops the buffer's at its length); sorted by row, with cu_work (batch + 1,) the first item of
    each row (as cu_seqlens). rows, tokens (S,): the store's segments (empty: none). On the CPU."""
    pieces = -(-tokens // split)  # (S,)
    segment = torch.repeat_interleave(torch.arange(len(tokens)), pieces)
    first = (torch.arange(len(segment)) - _exclusive(pieces)[segment]) * split
    stored = torch.stack([rows[segment], segment, first, torch.minimum(first + split, tokens[segment])], 1)
    first = torch.arange(buffer_pieces) * split
    one = torch.stack([torch.full_like(first, -1), first, first + split], 1)
    buffered = torch.cat([torch.arange(batch).repeat_interleave(buffer_pieces)[:, None], one.repeat(batch, 1)], 1)
    work = torch.cat([stored, buffered])
    work = work[torch.sort(work[:, 0], stable=True).indices]
    cu = torch.zeros(batch + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.bincount(work[:, 0], minlength=batch), 0)
    return work, cu


def _to(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small CPU table onto the device without a stream sync (a blocking copy waits for every
    kernel queued before it, so the host could never run ahead of the GPU)."""
    return t.to(dev, non_blocking=True)


def _check_sorted(side: Packed) -> None:
    """Each segment's outliers ascending (checked on CPU; on CUDA when asked)."""
    index = side.data.get("outlier_index")
    if index is None or index.shape[1] < 2 or (index.device.type == "cuda" and not CHECK_OUTLIER_ORDER):
        return
    step = index[:, 1:].long() - index[:, :-1].long()
    boundary = torch.zeros(index.shape[1] - 1, dtype=torch.bool)
    starts = side.offsets["outlier_index"][side.offsets["outlier_index"] > 0]
    boundary[starts - 1] = True  # a new segment may start lower
    assert bool(((step >= 0) | boundary.to(step.device)).all()), \
        "outlier_index must be sorted ascending in every segment (as gear_kernels.compress stores it)"


def _side_args(prefix: str, side: Packed | None, dim: int, block_n: int) -> tuple[dict, dict, object]:
    """A side's runtime ints, constexprs and constant tensor from its quantizer's triton_spec."""
    if side is None:  # the buffer only: never read, but compiled
        from .quantizers.uniform import dequant_entries, dequant_tile

        spec = dict(tile=dequant_tile, entry=dequant_entries, BITS=2, PW=4, LAYOUT=False, MODE=0, W=1, GW=1, CG=1,
                    consts=None)
        dtypes = [tl.float16, tl.float16]
    else:
        spec = side.quantizer.triton_spec(dim, side.groups, side.tokens, block_n)
        names = [f.name for f in side.quantizer.fields][1:] + [None] * QUANT_SLOTS
        consts = spec["consts"]
        dtypes = [TL_DTYPES[side.data[n].dtype] if n is not None else TL_DTYPES[consts.dtype] if consts is not None
                  else tl.float16 for n in names[:2]]
    ints = {f"{prefix}_W": spec["W"], f"{prefix}_GW": spec["GW"], f"{prefix}_CG": spec["CG"]}
    flags = {f"{prefix}_TILE": spec["tile"], f"{prefix}_ENTRY": spec["entry"], f"{prefix}_T1": dtypes[0],
             f"{prefix}_T2": dtypes[1], f"{prefix}_BITS": spec["BITS"], f"{prefix}_PW": spec["PW"],
             f"{prefix}_LAYOUT": spec["LAYOUT"], f"{prefix}_MODE": spec["MODE"]}
    return ints, flags, spec["consts"]


def _alignment(side: Packed | None) -> int:
    """Bytes (1 to 16, a power of two) that divide the address of this side's codes (its
    quantizer's first field, the bulk of what a tile reads) at every segment and head: the
    kernel's hint for vectorized loads."""
    if side is None:
        return 1
    codes = side.data[side.quantizer.fields[0].name]
    size = codes.element_size()
    offsets = side.offsets[side.quantizer.fields[0].name] * size
    return math.gcd(16, codes.data_ptr(), codes.stride(0) * size, *offsets.tolist())


@dataclass(frozen=True)
class _Launch:
    """What every launch over one store reads, built once a store (kept in its memo): the tables
    on the device, each side's kernel arguments, the segments' rows and tokens (CPU), the buffer
    slots each row skips (its missing sinks), and the work lists made so far."""

    fields: torch.Tensor
    segments: torch.Tensor
    ints: dict
    flags: dict
    rows: torch.Tensor
    tokens: torch.Tensor
    held: int  # tokens in all segments
    longest: int  # tokens of the longest segment (0: none)
    lead: torch.Tensor
    consts: tuple  # the quantizers' constant tensors on the device: the tables point into them
    works: dict = field(default_factory=dict)  # (split, buffer pieces) -> (work, cu_work) on the device

    def work(self, batch: int, buffer_pieces: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The work list and cu_work for this split (made once; the buffer's length does not enter)."""
        key = (split, buffer_pieces)
        if key not in self.works:
            device = self.fields.device
            self.works[key] = tuple(_to(t, device) for t in _work(self.rows, self.tokens, batch, buffer_pieces, split))
        return self.works[key]


def _launch(store: KVStore | None, batch: int, dev: torch.device, head_dim: int, block_n: int) -> _Launch:
    """The store's _Launch for this device and tile (built on the first call)."""
    memo = {} if store is None else store.memo
    key = ("triton", dev, block_n)
    if key in memo:
        return memo[key]
    keys = values = None
    if store is not None and store.keys is not None:
        keys, values = store.keys, store.values
        for side in (keys, values):
            _check_sorted(side)
            assert all(t.is_contiguous() for t in side.data.values()), "store fields must be contiguous"
    k_ints, k_flags, k_const = _side_args("K", keys, head_dim, block_n)
    v_ints, v_flags, v_const = _side_args("V", values, head_dim, block_n)
    consts = tuple(None if c is None else c.to(dev) for c in (k_const, v_const))
    if keys is not None:
        fields, segments = _tables(keys, values, list(consts))
        rows, tokens = keys.rows, keys.tokens
    else:
        fields = torch.zeros(2, 2, len(SLOTS), dtype=torch.int64)
        segments = torch.zeros(1, 2 + 2 * SIDE, dtype=torch.int64)
        rows = tokens = torch.zeros(0, dtype=torch.int64)
    rank = int(segments[:, 3].max()) if keys is not None and "lowrank_a" in keys.data else 1
    has_lr = keys is not None and "lowrank_a" in keys.data
    has_out = keys is not None and "outlier_index" in keys.data
    flags = {**k_flags, **v_flags,
             "HAS_LR": has_lr, "LR_T": TL_DTYPES[keys.data["lowrank_a"].dtype] if has_lr else tl.float16,
             "LR_Q": has_lr and "lowrank_a_scale" in keys.data, "HAS_OUT": has_out,
             "IDX_T": TL_DTYPES[keys.data["outlier_index"].dtype] if has_out else tl.int32,
             "VAL_T": TL_DTYPES[keys.data["outlier_values"].dtype] if has_out else tl.float16,
             "R_P": max(16, _pow2(rank)), "R_G": max(2, _pow2(rank)),
             "K_ALIGN": _alignment(keys), "V_ALIGN": _alignment(values)}
    lead = torch.zeros(batch, dtype=torch.int64)  # (batch,) buffer slots a row skips
    if store is not None and store.sinks is not None:
        lead = sinks_before_buffer(store, None, None)[2]
    launch = _Launch(_to(fields, dev), _to(segments, dev), {**k_ints, **v_ints}, flags, rows, tokens,
                     int(tokens.sum()), int(tokens.max()) if len(tokens) else 0, _to(lead.long(), dev), consts)
    memo[key] = launch
    return launch


@td.launches_on_input_device
def decode_attention_triton(
    q: torch.Tensor,
    store: KVStore | None,
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    scale: float,
    *,
    block_n: int | None = None,
    split_tokens: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention by the Triton kernels; same contract as decode_attention_torch.

    block_n / split_tokens: tile and split sizes (tests use them to force several tiles and
    splits); by default chosen from the device. out: where to write the result (like q).
    Nothing here waits for the GPU: the tables are built once a store, and each call copies at
    most its work list over, without a sync.
    """
    p = check_decode_inputs(q, store, k_buf, v_buf, scale)
    assert out is None or (out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
                           and out.is_contiguous()), "out must be a contiguous tensor like q"
    if store is None or store.rotation is None:
        return _attend(q, store, k_buf, v_buf, scale, p, block_n, split_tokens, out)
    # the store holds rotated K/V: attend in its basis, then rotate the output back
    k_buf, v_buf = (None if t is None else store.to_basis(t) for t in (k_buf, v_buf))
    result = store.from_basis(_attend(store.to_basis(q), store, k_buf, v_buf, scale, p, block_n, split_tokens, None))
    return result if out is None else out.copy_(result)


def _attend(q: torch.Tensor, store: KVStore | None, k_buf: torch.Tensor | None, v_buf: torch.Tensor | None,
            scale: float, p: DecodeProblem, block_n: int | None, split_tokens: int | None,
            out: torch.Tensor | None) -> torch.Tensor:
    """decode_attention_triton in the store's basis, on checked inputs (p: their shapes)."""
    dev = q.device
    if store is not None and store.sinks is not None:
        k_buf, v_buf, _ = sinks_before_buffer(store, k_buf, v_buf)
    n_buf = 0 if k_buf is None else k_buf.shape[2]
    td.check_device(dev)
    assert block_n is None or (block_n >= BUCKET and block_n == _pow2(block_n)), \
        f"block_n: a power of two >= {BUCKET}"
    q = q.contiguous()
    small = td.interpreter_sizes(dev)
    block_n = block_n or (64 if small else TUNING["block_n"])
    block_o = 64 if small else TUNING["block_o"]
    rows_total = p.ratio * p.q_len
    rows = max(16, min(_pow2(rows_total), 64))
    nrb = triton.cdiv(rows_total, rows)
    d_p = max(16, _pow2(p.head_dim))
    # tensor-core inputs: q.K and P.V in the model's dtype (fp32 accumulation); the small
    # corrections (low rank, outliers) in tf32. fp32 models: ieee fp32 throughout. The
    # interpreter computes 16-bit dots wrongly, so it uses fp32 (ieee) for all of them.
    full = q.dtype == torch.float32 or small
    dot = tl.float32 if full else TL_DTYPES[q.dtype]
    prec = "ieee" if full else "tf32"
    launch = _launch(store, p.batch, dev, p.head_dim, block_n)

    # work: splits of each segment and of the buffer, about TUNING's programs per SM in all
    if split_tokens is not None:
        per = split_tokens
    elif small:
        per = max(launch.longest, n_buf, 1)
    else:
        wanted = TUNING["programs_per_sm"] * td.num_sms(dev)
        per = triton.cdiv(launch.held + p.batch * n_buf, max(1, wanted // (p.kv_heads * nrb)))
    split = max(block_n, triton.cdiv(per, block_n) * block_n)
    work, cu_work = launch.work(p.batch, triton.cdiv(n_buf, split), split)
    n_work = len(work)

    if k_buf is not None:
        kb_, vb_ = k_buf.contiguous(), v_buf.contiguous()
    else:
        kb_ = vb_ = q
    m_tot = nrb * rows
    scratch = torch.full if POISON else (lambda shape, _fill, **kw: torch.empty(shape, **kw))
    m = scratch((n_work, p.kv_heads, m_tot), float("nan"), dtype=torch.float32, device=dev)
    l = scratch((n_work, p.kv_heads, m_tot), float("nan"), dtype=torch.float32, device=dev)
    acc = scratch((n_work, p.kv_heads, m_tot, d_p), float("nan"), dtype=torch.float32, device=dev)
    _attend_kernel[(n_work, p.kv_heads * nrb)](
        q, m, l, acc, work, launch.segments, launch.fields, kb_, vb_, launch.lead,
        n_buf, p.head_dim, p.kv_heads, p.q_len, p.ratio, rows_total, nrb, float(scale) * LOG2E,
        *launch.ints.values(), **launch.flags,
        CAUSAL=p.q_len > 1, ROWS=rows, BLOCK_N=block_n, D_P=d_p, BLOCK_O=block_o, BUCKET=BUCKET, DOT=dot, PREC=prec,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if out is None:
        out = torch.empty_like(q)
    _merge_kernel[(p.batch * p.kv_heads, nrb)](m, l, acc, out, cu_work, p.head_dim, p.kv_heads, p.q_len,
                                               p.ratio, rows_total, nrb, ROWS=rows, D_P=d_p, num_warps=4)
    return out
