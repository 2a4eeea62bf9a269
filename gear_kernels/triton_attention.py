"""Triton decode attention over a GEAR-compressed cache, beside attention_reference.py.

Computes what `attention_reference.decode_attention_torch` computes, reading packed codes,
scales, outliers and low-rank factors directly: the full-precision K/V of compressed tokens is
never built in memory (one tile of BLOCK_N tokens lives in registers at a time).

Flash-decoding: split every segment's tokens over programs, then merge partial softmax states.

1. `_segment_attn_kernel`, one program per (token split, batch row x kv head x query-row block).
   All query heads of a GQA group, times all q_len queries, are the rows of one program, so
   each K/V tile is read once per kv head and never repeated. Everything is held transposed
   (tokens or channels x query rows) so that the tensor-core M dimension is the tile's tokens
   or channels, which the warps split, not 16 padded query rows that every warp would hold.
   Over its tokens, tile by tile:
   - dequantize the K tile (`_dequant_tile`): whole packed words are loaded and split into
     codes in registers; scales and zeros are one vector per tile when the tile lies in one
     per-channel group (kivi keys, kcvt keys), one value per word for per-token groups; 3-bit
     codes (ten to an int32, words straddling tokens) and other odd layouts gather per entry;
   - scores^T = K q^T on the tensor cores in the model's dtype with fp32 accumulation (as
     chunk.decompress rounds K to the model dtype); fp32 models use ieee fp32;
   - low rank: + A (q B)^T, with (q B)^T (r x rows) computed once per program: rank-r work per
     token, never A B^T (tf32 dots, r padded to 16);
   - key outliers: the reconstruction is D + L with the outlier entries replaced by their exact
     values S, so an outlier at (t, d) adds q[d] * (S - D[t,d] - L[t,d]) to the score of token
     t (D and L recomputed at that entry from its code, scale, zero and A/B rows). Outliers
     are stored sorted by flat position t * head_dim + d (outliers.select_outliers), so a
     tile's outliers are one contiguous run: a program finds its first one with a 256-ary
     search (one vector load per level) and then walks forward BLOCK_O at a time in a while
     loop, never scanning other tiles' outliers. The corrections land on the score columns by
     a one-hot product (exact: one nonzero per sum), tf32;
   - online softmax in base 2 (running max and sum), masks for left padding (pad_len) and,
     in the buffer, for causality among the q_len queries;
   - values: acc^T += V^T P^T (V dequantized the same way); low rank accumulated as
     (P A)^T, rescaled with acc, times B once at the end; value outliers add
     P[:, t] * (S - D - L) to channel d: P picked at the outliers' tokens, and the products
     put on their channels, by two one-hot products;
   - the program writes (max, sum, unnormalised output) to its slot.
   The exact buffer, and exact chunks (method none), go through the same kernel (DENSE=True).
2. `_merge_kernel`, one program per (batch row x kv head, query-row block): merges every slot
   of every segment by the log-sum-exp rule and writes the output in q's dtype.

Launches: one per shared segment, one per row of a per-row segment, one for the buffer, one
merge. Splits are sized so that each launch has a few programs per SM.

Preconditions (asserted in `decode_attention_triton` through check_decode_inputs and its own
asserts): tensors on q's device (CUDA, or CPU under TRITON_INTERPRET=1); for q_len > 1, the
queries' own tokens in the buffer (n_buf >= q_len; dispatch.decode_attention falls back to
torch otherwise); outlier_index sorted ascending in every row (what chunk.compress and
compress_triton store; checked on CPU, and on CUDA when CHECK_OUTLIER_ORDER is set, since the
check costs a device sync). Each chunk is checked once, on its first launch, which also builds
its launch arguments and keeps them on the chunk (`_chunk_args`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .attention_reference import Segment, check_decode_inputs, is_per_row
from .chunk import CompressedChunk
from .packing import CODES_PER_WORD
from . import triton_device as td
from .triton_device import pow2 as _pow2

LOG2E = 1.4426950408889634
PROBES = 256  # loads per level of the outlier search
POISON = False  # tests: fill scratch buffers with NaN, so that an unwritten element shows
CHECK_OUTLIER_ORDER = False  # also check the outliers' order on CUDA (a device sync per chunk)


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# GPU sizes (the interpreter uses 64-token tiles and 64-outlier blocks): tokens per tile,
# outliers per block, warps per program, and how many programs per SM a launch aims for (the
# token splits: more programs hide more memory latency, at the cost of more partial states)
TUNING = {"block_n": 64, "block_o": 32, "num_warps": 4, "num_stages": 1, "programs_per_sm": 4}


@triton.jit
def _dequant(codes_ptr, scale_ptr, zero_ptr, tok, d, mask, D, NG, G,
             BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Dequantized entries (tok, d) of one slice (broadcastable index tensors), fp32."""
    flat = tok * D + d
    word = tl.load(codes_ptr + flat // PW, mask=mask, other=0).to(tl.int32)
    code = (word >> ((flat % PW) * BITS)) & ((1 << BITS) - 1)
    if PER_CHANNEL:
        g = d * NG + tok // G
    else:
        g = tok * NG + d // G
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * s + z


@triton.jit
def _dequant_tile(codes_ptr, scale_ptr, zero_ptr, t0, t_end, D, NG, G,
                  BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr, MODE: tl.constexpr,
                  BLOCK_N: tl.constexpr, D_P: tl.constexpr):
    """Tokens [t0, t0 + BLOCK_N) (those < t_end) of one slice, dequantized: (BLOCK_N, D_P) fp32.

    MODE 0: every entry gathers its own word, scale and zero (any layout, 3-bit words that
    straddle tokens included). MODE 1: whole words are loaded, (BLOCK_N, D/PW), and split into
    their PW codes in registers; scale and zero are loaded once per word (per-token groups,
    G a multiple of PW) or once per entry (per-channel groups). MODE 2: as 1, and the tile
    lies in one per-channel group, so scale and zero are one (D,) vector per tile.
    """
    tok = t0 + tl.arange(0, BLOCK_N)
    t_ok = tok < t_end
    d = tl.arange(0, D_P)
    if MODE == 0:
        ok = t_ok[:, None] & (d < D)[None, :]
        out = _dequant(codes_ptr, scale_ptr, zero_ptr, tok[:, None], d[None, :], ok, D, NG, G,
                       BITS, PW, PER_CHANNEL)
    else:
        WD: tl.constexpr = D_P // PW
        w = tl.arange(0, WD)
        j = tl.arange(0, PW)
        row_words = D // PW
        w_ok = t_ok[:, None] & (w < row_words)[None, :]
        words = tl.load(codes_ptr + tok[:, None] * row_words + w[None, :], mask=w_ok, other=0).to(tl.int32)
        codes = (words[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_N, D_P)).to(tl.float32)  # entry d = word * PW + j
        ok = t_ok[:, None] & (d < D)[None, :]
        if PER_CHANNEL:
            if MODE == 2:
                g = d * NG + t0 // G
                sc = tl.load(scale_ptr + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
                ze = tl.load(zero_ptr + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
            else:
                g = d[None, :] * NG + tok[:, None] // G
                sc = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)
                ze = tl.load(zero_ptr + g, mask=ok, other=0.0).to(tl.float32)
        else:
            g = tok[:, None] * NG + (w * PW)[None, :] // G  # a word never straddles two groups
            sc = tl.load(scale_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            ze = tl.load(zero_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
            ze = tl.reshape(tl.broadcast_to(ze[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
        out = codes * sc + ze
    return out


@triton.jit
def _lower_bound(idx_ptr, n, target, PROBES: tl.constexpr, ROUNDS: tl.constexpr):
    """First position p in [0, n) with idx[p] >= target (n if none), idx sorted ascending.

    Each round loads PROBES evenly spaced entries at once and keeps the gap that holds the
    answer; ROUNDS rounds cover n <= PROBES ** ROUNDS.
    """
    lo = n * 0
    size = n
    i = tl.arange(0, PROBES)
    for _ in tl.static_range(ROUNDS):
        stride = (size + PROBES - 1) // PROBES
        ok = i * stride < size
        v = tl.load(idx_ptr + lo + i * stride, mask=ok, other=0).to(tl.int32)
        c = tl.sum((ok & (v < target)).to(tl.int32), axis=0)
        new_lo = tl.where(c > 0, lo + (c - 1) * stride + 1, lo)
        size = tl.where(c > 0, tl.minimum(stride - 1, lo + size - new_lo), 0)
        lo = new_lo
    return lo


@triton.jit
def _outlier_block(idx_ptr, val_ptr, cur, n_out, limit, codes_ptr, scale_ptr, zero_ptr, a_ptr, b_ptr,
                   D, NG, G, R, a_st, a_sr, b_sd, b_sr,
                   BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_LR: tl.constexpr,
                   BLOCK_O: tl.constexpr, R_G: tl.constexpr):
    """Up to BLOCK_O outliers from position `cur` whose flat index is < limit.

    Returns their token, channel, correction S - D - L (0 where not taken), the taken mask and
    how many were taken.
    """
    o = cur + tl.arange(0, BLOCK_O)
    ok = o < n_out
    idx = tl.load(idx_ptr + o, mask=ok, other=0).to(tl.int32)
    ok = ok & (idx < limit)
    taken = tl.sum(ok.to(tl.int32), axis=0)
    t = idx // D
    d = idx % D
    approx = _dequant(codes_ptr, scale_ptr, zero_ptr, t, d, ok, D, NG, G, BITS, PW, PER_CHANNEL)
    if HAS_LR:
        r = tl.arange(0, R_G)
        rm = ok[:, None] & (r < R)[None, :]
        a = tl.load(a_ptr + t[:, None] * a_st + r[None, :] * a_sr, mask=rm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d[:, None] * b_sd + r[None, :] * b_sr, mask=rm, other=0.0).to(tl.float32)
        approx += tl.sum(a * b, axis=1)
    exact = tl.load(val_ptr + o, mask=ok, other=0.0).to(tl.float32)
    return t, d, tl.where(ok, exact - approx, 0.0), ok, taken


@triton.jit
def _segment_attn_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr, pad_ptr,
    kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, kb_ptr,
    vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, vb_ptr,
    k_sb, k_sh, k_st, v_sb, v_sh, v_st,  # dense strides (elements; last dim contiguous)
    k_c_bh, k_s_bh, k_o_bh, k_a_bh, k_a_t, k_a_r, k_b_bh, k_b_d, k_b_r, k_ng, k_g, k_nout, k_r,
    v_c_bh, v_s_bh, v_o_bh, v_a_bh, v_a_t, v_a_r, v_b_bh, v_b_d, v_b_r, v_ng, v_g, v_nout, v_r,
    T, D, H, QH, QL, RATIO, M, NRB, b_offset, pos0, split, slot0, n_slots, causal0, scale_log2,
    DENSE: tl.constexpr,
    K_BITS: tl.constexpr, K_PW: tl.constexpr, K_PC: tl.constexpr, K_MODE: tl.constexpr,
    K_LR: tl.constexpr, K_OUT: tl.constexpr,
    V_BITS: tl.constexpr, V_PW: tl.constexpr, V_PC: tl.constexpr, V_MODE: tl.constexpr,
    V_LR: tl.constexpr, V_OUT: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    D_P: tl.constexpr, R_P: tl.constexpr, R_G: tl.constexpr, BLOCK_O: tl.constexpr, PROBES: tl.constexpr,
    K_ROUNDS: tl.constexpr, V_ROUNDS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    # Everything is kept transposed (tokens or channels x query rows): with at most a few
    # query rows, the tensor-core M dimension is then the tile's tokens or channels, which the
    # warps split, instead of 16 padded query rows that every warp would hold in full.
    pid_s = tl.program_id(0)
    pid_1 = tl.program_id(1)
    bh_local = pid_1 // NRB  # (batch row, kv head) inside this segment's tensors
    rb = pid_1 % NRB
    b = b_offset + bh_local // H
    h = bh_local % H
    bh = b * H + h  # in q, the partials and the output
    bh64 = bh_local.to(tl.int64)

    rows = rb * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    qi = rows % QL  # query index of each row; rows // QL is the member of the GQA group
    d = tl.arange(0, D_P)
    d_ok = d < D
    q_off = ((b.to(tl.int64) * QH + h * RATIO + rows // QL) * QL + qi) * D
    q_t = tl.load(q_ptr + q_off[None, :] + d[:, None], mask=d_ok[:, None] & row_ok[None, :],
                  other=0.0).to(DOT)  # (D_P, ROWS)

    # this program's tokens
    t_begin = pid_s * split
    t_end = tl.minimum(t_begin + split, T)
    if HAS_PAD:
        pad = tl.load(pad_ptr + b).to(tl.int32)

    if not DENSE:
        k_codes = kc_ptr + bh64 * k_c_bh
        k_scale = ks_ptr + bh64 * k_s_bh
        k_zero = kz_ptr + bh64 * k_s_bh
        v_codes = vc_ptr + bh64 * v_c_bh
        v_scale = vs_ptr + bh64 * v_s_bh
        v_zero = vz_ptr + bh64 * v_s_bh
        r = tl.arange(0, R_P)  # rank, padded to a tensor-core width
        if K_LR:
            k_a = ka_ptr + bh64 * k_a_bh
            k_b = kb_ptr + bh64 * k_b_bh
            bk_t = tl.load(k_b + d[None, :] * k_b_d + r[:, None] * k_b_r, mask=d_ok[None, :] & (r < k_r)[:, None],
                           other=0.0).to(tl.float32)  # B^T (R_P, D_P)
            qb_t = tl.dot(bk_t, q_t.to(tl.float32), input_precision=PREC)  # (q B)^T (R_P, ROWS), once
        else:
            k_a = ka_ptr
            k_b = kb_ptr
        if V_LR:
            v_a = va_ptr + bh64 * v_a_bh
            v_b = vb_ptr + bh64 * v_b_bh
            acc_a = tl.zeros((R_P, ROWS), tl.float32)  # (P A)^T, rescaled with acc
        else:
            v_a = va_ptr
            v_b = vb_ptr
        if K_OUT:
            k_idx = koi_ptr + bh64 * k_o_bh
            k_val = kov_ptr + bh64 * k_o_bh
            k_cur = _lower_bound(k_idx, k_nout, t_begin * D, PROBES, K_ROUNDS)
        if V_OUT:
            v_idx = voi_ptr + bh64 * v_o_bh
            v_val = vov_ptr + bh64 * v_o_bh
            v_cur = _lower_bound(v_idx, v_nout, t_begin * D, PROBES, V_ROUNDS)

    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((D_P, ROWS), tl.float32)  # output^T
    cols = tl.arange(0, BLOCK_N)

    for t0 in range(t_begin, t_end, BLOCK_N):
        tok = t0 + cols
        t_ok = tok < t_end
        # ---- scores^T (BLOCK_N, ROWS)
        if DENSE:
            k = tl.load(kc_ptr + (bh_local // H).to(tl.int64) * k_sb + h * k_sh + tok[:, None] * k_st + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = _dequant_tile(k_codes, k_scale, k_zero, t0, t_end, D, k_ng, k_g,
                              K_BITS, K_PW, K_PC, K_MODE, BLOCK_N, D_P)
        s = tl.dot(k.to(DOT), q_t, input_precision=PREC)  # fp32 accumulation
        if not DENSE:
            if K_LR:
                a = tl.load(k_a + tok[:, None] * k_a_t + r[None, :] * k_a_r, mask=t_ok[:, None] & (r < k_r)[None, :],
                            other=0.0).to(tl.float32)  # A tile (BLOCK_N, R_P)
                s += tl.dot(a, qb_t, input_precision=PREC)  # A (q B)^T: the rank-r part, never A B^T
            if K_OUT:
                limit = tl.minimum(t0 + BLOCK_N, t_end) * D
                more = k_cur < k_nout
                while more:
                    ot, od, delta, ook, taken = _outlier_block(
                        k_idx, k_val, k_cur, k_nout, limit, k_codes, k_scale, k_zero, k_a, k_b,
                        D, k_ng, k_g, k_r, k_a_t, k_a_r, k_b_d, k_b_r, K_BITS, K_PW, K_PC, K_LR, BLOCK_O, R_G)
                    qd = tl.load(q_ptr + q_off[None, :] + od[:, None], mask=ook[:, None] & row_ok[None, :],
                                 other=0.0).to(tl.float32)  # q[row, d] of each outlier (BLOCK_O, ROWS)
                    onehot = (cols[:, None] == (ot - t0)[None, :]) & ook[None, :]  # (BLOCK_N, BLOCK_O)
                    s += tl.dot(onehot.to(tl.float32), qd * delta[:, None], input_precision=PREC)
                    k_cur += taken
                    more = (taken == BLOCK_O) & (k_cur < k_nout)
        # ---- online softmax over the tile's tokens (axis 0)
        valid = t_ok
        if HAS_PAD:
            valid = valid & (pos0 + tok >= pad)
        valid2 = valid[:, None] & row_ok[None, :]
        if CAUSAL:
            valid2 = valid2 & (tok[:, None] <= (causal0 + qi)[None, :])
        s = tl.where(valid2, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[None, :])  # (BLOCK_N, ROWS)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :]
        m_i = m_new
        # ---- values: acc^T += V^T P^T
        if DENSE:
            v = tl.load(vc_ptr + (bh_local // H).to(tl.int64) * v_sb + h * v_sh + tok[:, None] * v_st + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = _dequant_tile(v_codes, v_scale, v_zero, t0, t_end, D, v_ng, v_g,
                              V_BITS, V_PW, V_PC, V_MODE, BLOCK_N, D_P)
        p_dot = p.to(DOT)
        acc += tl.dot(tl.trans(v.to(DOT)), p_dot, input_precision=PREC)
        if not DENSE:
            if V_LR:
                a_t = tl.load(v_a + tok[None, :] * v_a_t + r[:, None] * v_a_r, mask=t_ok[None, :] & (r < v_r)[:, None],
                              other=0.0)  # A^T tile (R_P, BLOCK_N)
                acc_a = acc_a * alpha[None, :] + tl.dot(a_t.to(DOT), p_dot, input_precision=PREC)
            if V_OUT:
                limit = tl.minimum(t0 + BLOCK_N, t_end) * D
                more = v_cur < v_nout
                while more:
                    ot, od, delta, ook, taken = _outlier_block(
                        v_idx, v_val, v_cur, v_nout, limit, v_codes, v_scale, v_zero, v_a, v_b,
                        D, v_ng, v_g, v_r, v_a_t, v_a_r, v_b_d, v_b_r, V_BITS, V_PW, V_PC, V_LR, BLOCK_O, R_G)
                    pick = ((ot - t0)[:, None] == cols[None, :]) & ook[:, None]  # (BLOCK_O, BLOCK_N)
                    pt = tl.dot(pick.to(tl.float32), p, input_precision=PREC)  # P[t of each outlier] (BLOCK_O, ROWS)
                    put = (d[:, None] == od[None, :]) & ook[None, :]  # (D_P, BLOCK_O)
                    acc += tl.dot(put.to(tl.float32), pt * delta[:, None], input_precision=PREC)
                    v_cur += taken
                    more = (taken == BLOCK_O) & (v_cur < v_nout)

    if not DENSE:
        if V_LR:
            bv = tl.load(v_b + d[:, None] * v_b_d + r[None, :] * v_b_r, mask=d_ok[:, None] & (r < v_r)[None, :],
                         other=0.0).to(tl.float32)  # B (D_P, R_P)
            acc += tl.dot(bv, acc_a, input_precision=PREC)  # ((P A) B^T)^T

    M_TOT = NRB * ROWS
    slot = (bh.to(tl.int64) * n_slots + slot0 + pid_s) * M_TOT + rows
    tl.store(m_ptr + slot, m_i)
    tl.store(l_ptr + slot, l_i)
    tl.store(acc_ptr + slot[None, :] * D_P + d[:, None], acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_slots, D, H, QH, QL, RATIO, M, NRB,
                  ROWS: tl.constexpr, D_P: tl.constexpr):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = rb * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_P)
    M_TOT = NRB * ROWS
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D_P), tl.float32)
    for s in range(0, n_slots):
        slot = (bh.to(tl.int64) * n_slots + s) * M_TOT + rows
        m_s = tl.load(m_ptr + slot)
        l_s = tl.load(l_ptr + slot)
        a_s = tl.load(acc_ptr + slot[:, None] * D_P + d[None, :])
        live = l_s != 0  # an empty slot (or one zeroed and left unwritten) adds nothing; NaN propagates
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
    o_off = ((b.to(tl.int64) * QH + h * RATIO + rows // QL) * QL + rows % QL) * D
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < D)[None, :])


def _rounds(n: int) -> int:
    rounds = 1
    while PROBES ** rounds < n:
        rounds += 1
    return rounds


class _Plan:
    """Launch sizes shared by every launch of one call."""

    def __init__(self, q: torch.Tensor, p, block_n: int | None, split_tokens: int | None):
        self.small = td.interpreter_sizes(q.device)
        self.rows_total = p.ratio * p.q_len
        self.rows = max(16, min(_pow2(self.rows_total), 64))
        self.nrb = triton.cdiv(self.rows_total, self.rows)
        self.d_p = max(16, _pow2(p.head_dim))
        self.forced = block_n is not None
        if block_n is None:
            block_n = 64 if self.small else TUNING["block_n"]
        self.block_n = block_n
        self.block_o = 64 if self.small else TUNING["block_o"]
        self.num_warps = TUNING["num_warps"]
        self.num_stages = TUNING["num_stages"]
        self.split_tokens = split_tokens
        # tensor-core inputs: q.K and P.V in the model's dtype (fp32 accumulation); the small
        # corrections (low rank, outliers) in tf32. fp32 models: ieee fp32 throughout. The
        # interpreter computes 16-bit dots wrongly, so it uses fp32 (ieee) for all of them.
        full = q.dtype == torch.float32 or self.small
        self.dot = tl.float32 if full else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype]
        self.prec = "ieee" if full else "tf32"
        self.programs_wanted = TUNING["programs_per_sm"] * td.num_sms(q.device)

    def tile(self, key: CompressedChunk | None) -> int:
        """Tokens per tile for a launch over `key` (and its value chunk): the gather path
        (3-bit codes, odd layouts) holds more per entry, so its tiles are at most 32 tokens."""
        if self.forced or self.small or key is None or key.exact is not None:
            return self.block_n
        return min(self.block_n, 32) if _gathers(key) else self.block_n

    def split(self, tokens: int, programs: int, block_n: int) -> int:
        """Tokens per program for a segment of `tokens` tokens launched over `programs` programs."""
        if self.split_tokens is not None:
            per = self.split_tokens
        elif self.small:
            per = tokens
        else:
            per = triton.cdiv(tokens, max(1, self.programs_wanted // max(1, programs)))
        return max(block_n, triton.cdiv(per, block_n) * block_n)

    def n_split(self, tokens: int, programs: int, key: CompressedChunk | None) -> int:
        return triton.cdiv(tokens, self.split(tokens, programs, self.tile(key)))


def _gathers(chunk: CompressedChunk) -> bool:
    """Whether a compressed chunk is read entry by entry (MODE 0 of _dequant_tile)."""
    pw = CODES_PER_WORD[chunk.bits]
    return chunk.bits == 3 or chunk.shape[-1] % pw != 0 or (not chunk.per_channel and chunk.group % pw != 0)


def _rows_view(t: torch.Tensor, inner: int) -> torch.Tensor:
    """t (batch, heads, ...) whose (batch, head) index collapses to one stride and whose last
    `inner` dims are row-major contiguous; copies only when that does not hold."""
    shape, stride = t.shape, t.stride()
    expect = 1
    ok = True
    for size, st in reversed(list(zip(shape[-inner:], stride[-inner:]))):
        ok &= size == 1 or st == expect
        expect *= size
    ok &= shape[0] == 1 or stride[0] == shape[1] * stride[1]
    return t if ok else t.contiguous()


def _bh_collapsible(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1) else t.contiguous()


def _dense_args(dense: torch.Tensor, dummy: torch.Tensor):
    """(pointers, dense strides, runtime ints, constexprs, rank, outlier count) of an exact K or V."""
    if dense.stride(-1) != 1:
        dense = dense.contiguous()
    ptrs = [dense] + [dummy] * 6
    strides = [dense.stride(0), dense.stride(1), dense.stride(2)]
    return ptrs, strides, [0] * 9 + [1, 1, 0, 1], dict(BITS=2, PW=4, PC=False, LR=False, OUT=False), 0, 0


def _chunk_args(c: CompressedChunk):
    """(pointers, dense strides, runtime ints, constexprs, rank, outlier count) of a compressed
    K or V chunk, checked and built on its first launch and then kept on the chunk: a chunk's
    tensors never change after compress (reordering rows makes a new chunk), and rebuilding
    these on every decode step was a large share of the host time per call."""
    cached = getattr(c, "_triton_args", None)
    if cached is not None:
        return cached
    dev = c.codes.device
    for name, t in c.tensors().items():
        assert t.device == dev, f"chunk tensor {name} is on {t.device}, its codes on {dev}"
    if c.outlier_index is not None and c.outlier_index.shape[-1] > 1 and (dev.type != "cuda" or CHECK_OUTLIER_ORDER):
        index = c.outlier_index.long()  # unsigned index types do not compare on every device
        assert bool((index[..., 1:] > index[..., :-1]).all()), \
            "outlier_index must be sorted ascending in every row (as gear_kernels.compress stores it)"
    tokens, dim = c.shape[2], c.shape[3]
    assert c.codes is not None and c.scale is not None and c.zero is not None, "chunk without codes"
    assert c.scale.shape[-2] == (dim if c.per_channel else tokens), "scale shape does not match the layout"
    codes, scale, zero = _rows_view(c.codes, 1), _rows_view(c.scale, 2), _rows_view(c.zero, 2)
    assert scale.stride() == zero.stride(), "scale and zero must share a layout"
    has_lr = c.lowrank_a is not None and c.lowrank_a.shape[-1] > 0
    has_out = c.outlier_values is not None and c.outlier_values.shape[-1] > 0
    rank = c.lowrank_a.shape[-1] if has_lr else 0
    n_out = c.outlier_values.shape[-1] if has_out else 0
    dummy = codes  # pointer for the operands this chunk lacks: never read
    if has_out:
        o_idx, o_val = _rows_view(c.outlier_index, 1), _rows_view(c.outlier_values, 1)
        assert o_idx.stride() == o_val.stride(), "outlier index and values must share a layout"
        assert not o_idx.is_floating_point(), "outlier_index must be integer"
    else:
        o_idx = o_val = dummy
    if has_lr:
        a, b = _bh_collapsible(c.lowrank_a), _bh_collapsible(c.lowrank_b)
        lr = [a.stride(1), a.stride(2), a.stride(3), b.stride(1), b.stride(2), b.stride(3)]
    else:
        a = b = dummy
        lr = [0] * 6
    ptrs = [codes, scale, zero, o_idx, o_val, a, b]
    ints = [codes.stride(1), scale.stride(1), o_idx.stride(1) if has_out else 0, *lr,
            scale.shape[-1], c.group, n_out, max(rank, 1)]
    consts = dict(BITS=c.bits, PW=CODES_PER_WORD[c.bits], PC=c.per_channel, LR=has_lr, OUT=has_out,
                  G=c.group, NG=scale.shape[-1], D=dim)
    c._triton_args = (ptrs, [0, 0, 0], ints, consts, rank, n_out)
    return c._triton_args


def _mode(consts: dict, block_n: int) -> int:
    """How _dequant_tile reads a chunk (see there): 0 gather, 1 whole words, 2 words + one group."""
    if "G" not in consts:
        return 0  # dense operand: unused
    pw, g = consts["PW"], consts["G"]
    if consts["BITS"] == 3 or consts["D"] % pw or (not consts["PC"] and g % pw):
        return 0
    if consts["PC"] and (consts["NG"] == 1 or g % block_n == 0):
        return 2
    return 1


def _launch(plan: _Plan, p, q, parts, pad_len, key, value, kbuf, vbuf, tokens, b_offset, batch_here,
            pos0, slot0, n_slots, scale_log2, causal):
    dummy = parts[0]
    block_n = plan.tile(key)
    if key is not None and key.exact is not None:  # method none: an exact chunk is read like the buffer
        assert value.exact is not None, "a key chunk stored exactly needs its value chunk stored exactly"
        key, value, kbuf, vbuf = None, None, key.exact, value.exact
    assert value is None or value.exact is None, "a value chunk stored exactly needs its key chunk stored exactly"
    for chunk in (key, value):
        assert chunk is None or chunk.codes.device == q.device, f"a chunk is on {chunk.codes.device}, q on {q.device}"
    kp, ks, ki, kc, kr, kn = _dense_args(kbuf, dummy) if key is None else _chunk_args(key)
    vp, vs, vi, vc, vr, vn = _dense_args(vbuf, dummy) if value is None else _chunk_args(value)
    dense = kbuf is not None
    programs = batch_here * p.kv_heads * plan.nrb
    split = plan.split(tokens, programs, block_n)
    n_split = triton.cdiv(tokens, split)
    rank = max(kr, vr)
    _segment_attn_kernel[(n_split, programs)](
        q, *parts, pad_len if pad_len is not None else dummy,
        *kp, *vp, *ks, *vs, *ki, *vi,
        tokens, p.head_dim, p.kv_heads, p.q_heads, p.q_len, p.ratio, plan.rows_total, plan.nrb,
        b_offset, pos0, split, slot0, n_slots, p.n_buf - p.q_len, scale_log2,
        DENSE=dense,
        K_BITS=kc["BITS"], K_PW=kc["PW"], K_PC=kc["PC"], K_MODE=_mode(kc, block_n), K_LR=kc["LR"], K_OUT=kc["OUT"],
        V_BITS=vc["BITS"], V_PW=vc["PW"], V_PC=vc["PC"], V_MODE=_mode(vc, block_n), V_LR=vc["LR"], V_OUT=vc["OUT"],
        HAS_PAD=pad_len is not None, CAUSAL=causal, ROWS=plan.rows, BLOCK_N=block_n,
        D_P=plan.d_p, R_P=max(16, _pow2(rank)), R_G=max(2, _pow2(rank)), BLOCK_O=plan.block_o, PROBES=PROBES,
        K_ROUNDS=_rounds(kn), V_ROUNDS=_rounds(vn), DOT=plan.dot, PREC=plan.prec,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return n_split


def decode_attention_triton(
    q: torch.Tensor,
    key_segments: Sequence[Segment],
    value_segments: Sequence[Segment],
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    scale: float,
    pad_len: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    split_tokens: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention by the Triton kernels; same contract as decode_attention_torch.

    block_n / split_tokens: tile and split sizes (tests use them to force several tiles and
    splits); by default chosen from the device. out: where to write the result (like q).
    """
    p = check_decode_inputs(q, key_segments, value_segments, k_buf, v_buf, scale, pad_len)
    dev = q.device
    td.check_device(dev)
    assert p.q_len == 1 or p.n_buf >= p.q_len, (
        "the Triton path applies causality inside the buffer: q_len > 1 needs the queries' own "
        "tokens in the buffer (use the torch path)"
    )
    assert block_n is None or (block_n >= 16 and block_n == _pow2(block_n)), "block_n: a power of two >= 16"
    if pad_len is not None:
        pad_len = pad_len.to(device=dev, dtype=torch.int32).contiguous()
    q = q.contiguous()
    plan = _Plan(q, p, block_n, split_tokens)
    scale_log2 = float(scale) * LOG2E

    # Every launch writes its splits' partial states into slots [slot0, slot0 + splits) of each
    # of its (row, kv head); the pieces of a per-row segment share one slot range.
    launches = []  # (key, value, k_dense, v_dense, tokens, b_offset, rows here, pos0, slot0)
    n_slots, pos, sparse = 0, 0, False
    for ks, vs in zip(key_segments, value_segments):
        if not is_per_row(ks):
            launches.append((ks, vs, None, None, ks.shape[2], 0, p.batch, pos, n_slots))
            n_slots += plan.n_split(ks.shape[2], p.batch * p.kv_heads * plan.nrb, ks)
            pos += ks.shape[2]
            continue
        widest = 0
        for row, (kc, vc) in enumerate(zip(ks, vs)):
            if kc is not None:
                launches.append((kc, vc, None, None, kc.shape[2], row, 1, 0, n_slots))
                widest = max(widest, plan.n_split(kc.shape[2], p.kv_heads * plan.nrb, kc))
        sparse = sparse or p.batch > 1  # rows' pieces differ in splits (or are None)
        n_slots += widest
    if p.n_buf:
        launches.append((None, None, k_buf, v_buf, p.n_buf, 0, p.batch, pos, n_slots))
        n_slots += plan.n_split(p.n_buf, p.batch * p.kv_heads * plan.nrb, None)
    m_tot = plan.nrb * plan.rows
    bh = p.batch * p.kv_heads
    scratch = _poisoned if POISON else torch.empty
    m = scratch((bh, n_slots, m_tot), dtype=torch.float32, device=dev)
    # the merge treats a slot whose sum is 0 as empty: zero the sums when some stay unwritten
    l = (torch.zeros if sparse else scratch)((bh, n_slots, m_tot), dtype=torch.float32, device=dev)
    acc = scratch((bh, n_slots, m_tot, plan.d_p), dtype=torch.float32, device=dev)
    for kc, vc, kb, vb, tokens, b_off, nb, pos0, slot0 in launches:
        _launch(plan, p, q, (m, l, acc), pad_len, kc, vc, kb, vb, tokens, b_off, nb, pos0,
                slot0, n_slots, scale_log2, causal=kb is not None and p.q_len > 1)
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == dev and out.is_contiguous(), \
            "out must be a contiguous tensor like q"
    _merge_kernel[(bh, plan.nrb)](m, l, acc, out, n_slots, p.head_dim, p.kv_heads, p.q_heads, p.q_len,
                                  p.ratio, plan.rows_total, plan.nrb, ROWS=plan.rows, D_P=plan.d_p, num_warps=4)
    return out
