"""Triton decode attention over one layer's KVStore, beside attention_reference.py.

Computes what `attention_reference.decode_attention_torch` computes, reading the store's
packed codes, scales, outliers and low-rank factors directly: the full-precision K/V of the
compressed tokens is never built (one tile of BLOCK_N tokens lives in registers at a time).

Two launches a call, whatever the batch, its padding and the number of chunks held:

1. `_attend_kernel`, grid (rows x J work items, kv heads x query-row blocks). A row's work
   items are, in order, JP splits of its prompt tokens (varlen: the row's own tokens only, so
   left padding costs nothing and needs no mask), JS splits of the streamed chunks (whole
   chunks each) and JB splits of the exact buffer, the store's sinks first (exact too; a row
   starts past its empty sink slots); an item past the end of its row's tokens writes an
   empty state. All query heads of a GQA group, times all q_len queries, are the rows
   of one program, so a K/V tile is read once per kv head and never repeated. Everything is
   held transposed (tokens or channels x query rows) so that the tensor-core M dimension is the
   tile's tokens or channels, which the warps split, not 16 padded query rows every warp holds.
   Per compressed slice (a row's prompt, or one chunk of a row), tile by tile (`_attend_slice`):
   - keys and values each have their own code width (K_BITS / V_BITS, K_W / V_W bytes a
     token: key_bits and value_bits); int8 low-rank factors (LR_Q) are scaled by their column
     scales as they are loaded, so everything below reads fp32 factors either way;
   - dequantize the K tile (`_dequant_tile`): whole bytes are loaded and split into codes in
     registers; scales and zeros are one vector a tile when the tile lies in one per-channel
     group (kivi keys), one value a byte for per-token groups; 3-bit codes (8 to 3 bytes) and
     odd layouts gather per entry;
   - scores^T = K q^T on the tensor cores in the model's dtype with fp32 accumulation (as
     chunk.decompress rounds K to the model dtype); fp32 models use ieee fp32;
   - low rank: + A (q B)^T, with (q B)^T (r x rows) computed once a slice: rank-r work per
     token, never A B^T (tf32 dots, r padded to 16);
   - key outliers: the reconstruction is D + L with the outlier entries replaced by their exact
     values S, so an outlier at (t, d) adds q[d] * (S - D[t,d] - L[t,d]) to the score of token
     t. The store keeps each slice's outliers sorted and bucketed by 16 tokens (store.BUCKET),
     so a tile reads its own outliers between two offsets, BLOCK_O at a time, with no search;
     the corrections land on the score columns by a one-hot product (exact: one nonzero a sum);
   - online softmax in base 2 (running max and sum); in the buffer, causality among the q_len
     queries;
   - values: acc^T += V^T P^T (V dequantized the same way); low rank accumulated as (P A)^T,
     rescaled with acc, times B at the slice's end; value outliers add P[:, t] * (S - D - L)
     to channel d through two one-hot products.
2. `_merge_kernel`, one program per (row x kv head, query-row block): merges the J partial
   states by the log-sum-exp rule and writes the output in q's dtype.

Preconditions (checked in `decode_attention_triton` through check_decode_inputs and its own
asserts): tensors on q's device (CUDA, or CPU under TRITON_INTERPRET=1); for q_len > 1, the
queries' own tokens in the buffer; the store's outliers sorted in every slice (as compress and
compress_triton store them; checked on CPU, and on CUDA when CHECK_OUTLIER_ORDER is set, since
the check costs a device sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_device as td
from .attention_reference import check_decode_inputs, sinks_before_buffer
from .packing import CODES_PER_WORD
from .store import BUCKET, KVStore, PromptPart, StreamPart
from .triton_device import pow2 as _pow2

LOG2E = 1.4426950408889634
POISON = False  # tests: fill scratch buffers with NaN, so that an unwritten element shows
CHECK_OUTLIER_ORDER = False  # also check the outliers' order on CUDA (a device sync per call)

# GPU sizes (the interpreter uses 64-token tiles and 64-outlier blocks): tokens per tile,
# outliers per block, warps per program, and how many programs a launch aims for per SM (more
# programs hide more memory latency, at the cost of more partial states to merge)
TUNING = {"block_n": 64, "block_o": 32, "num_warps": 4, "num_stages": 1, "programs_per_sm": 4}


@triton.jit
def _dequant(codes_ptr, scale_ptr, zero_ptr, tok, d, mask, W, GS, G,
             BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Dequantized entries (tok, d) of one slice (broadcastable index tensors), fp32.

    codes: W bytes a token; scale/zero: (D, ...) with row stride GS and groups of G tokens when
    PER_CHANNEL, else (tokens, GS) with groups of G channels.
    """
    if BITS == 3:  # 8 codes in a 3-byte word; a code may straddle two bytes
        bit = (d % 8) * 3
        byte = tok * W + (d // 8) * 3 + bit // 8
        shift = bit % 8
        lo = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
        hi = tl.load(codes_ptr + byte + 1, mask=mask & (shift > 5), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift) & 7
    else:
        byte = tl.load(codes_ptr + tok * W + d // PW, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((d % PW) * BITS)) & ((1 << BITS) - 1)
    if PER_CHANNEL:
        g = d * GS + tok // G
    else:
        g = tok * GS + d // G
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * s + z


@triton.jit
def _dequant_tile(codes_ptr, scale_ptr, zero_ptr, t0, t_end, D, W, GS, G,
                  BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr, MODE: tl.constexpr,
                  BLOCK_N: tl.constexpr, D_P: tl.constexpr):
    """Tokens [t0, t0 + BLOCK_N) (those < t_end) of one slice, dequantized: (BLOCK_N, D_P) fp32.

    MODE 0: every entry gathers its own bytes, scale and zero (any layout, 3-bit included).
    MODE 1: whole bytes are loaded, (BLOCK_N, D / PW), and split into their PW codes in
    registers; scale and zero are loaded once a byte (per-token groups, G a multiple of PW) or
    once an entry (per-channel groups). MODE 2: as 1, and the tile lies in one per-channel
    group, so scale and zero are one (D,) vector a tile.
    """
    tok = t0 + tl.arange(0, BLOCK_N)
    t_ok = tok < t_end
    d = tl.arange(0, D_P)
    if MODE == 0:
        ok = t_ok[:, None] & (d < D)[None, :]
        out = _dequant(codes_ptr, scale_ptr, zero_ptr, tok[:, None], d[None, :], ok, W, GS, G,
                       BITS, PW, PER_CHANNEL)
    else:
        WD: tl.constexpr = D_P // PW
        w = tl.arange(0, WD)
        j = tl.arange(0, PW)
        w_ok = t_ok[:, None] & (w < W)[None, :]
        words = tl.load(codes_ptr + tok[:, None] * W + w[None, :], mask=w_ok, other=0).to(tl.int32)
        codes = (words[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_N, D_P)).to(tl.float32)  # entry d = byte * PW + j
        ok = t_ok[:, None] & (d < D)[None, :]
        if PER_CHANNEL:
            if MODE == 2:
                g = d * GS + t0 // G
                sc = tl.load(scale_ptr + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
                ze = tl.load(zero_ptr + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
            else:
                g = d[None, :] * GS + tok[:, None] // G
                sc = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)
                ze = tl.load(zero_ptr + g, mask=ok, other=0.0).to(tl.float32)
        else:
            g = tok[:, None] * GS + (w * PW)[None, :] // G  # a byte never straddles two groups
            sc = tl.load(scale_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            ze = tl.load(zero_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
            ze = tl.reshape(tl.broadcast_to(ze[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
        out = codes * sc + ze
    return out


@triton.jit
def _outlier_block(idx_ptr, val_ptr, o0, o_end, codes_ptr, scale_ptr, zero_ptr, a_ptr, b_ptr, as_ptr, bs_ptr,
                   D, W, GS, G, R, a_st, b_sd,
                   BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_LR: tl.constexpr,
                   LR_Q: tl.constexpr, BLOCK_O: tl.constexpr, R_G: tl.constexpr):
    """Outliers [o0, min(o0 + BLOCK_O, o_end)) of a slice: their token, channel, correction
    S - D - L (0 where not taken) and the taken mask. LR_Q: int8 factors, times the column
    scales at as_ptr / bs_ptr."""
    o = o0 + tl.arange(0, BLOCK_O)
    ok = o < o_end
    idx = tl.load(idx_ptr + o, mask=ok, other=0).to(tl.int32)
    t = idx // D
    d = idx % D
    approx = _dequant(codes_ptr, scale_ptr, zero_ptr, t, d, ok, W, GS, G, BITS, PW, PER_CHANNEL)
    if HAS_LR:
        r = tl.arange(0, R_G)
        rm = ok[:, None] & (r < R)[None, :]
        a = tl.load(a_ptr + t[:, None] * a_st + r[None, :], mask=rm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d[:, None] * b_sd + r[None, :], mask=rm, other=0.0).to(tl.float32)
        if LR_Q:
            a = a * tl.load(as_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
            b = b * tl.load(bs_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
        approx += tl.sum(a * b, axis=1)
    exact = tl.load(val_ptr + o, mask=ok, other=0.0).to(tl.float32)
    return t, d, tl.where(ok, exact - approx, 0.0), ok


@triton.jit
def _attend_slice(
    m_i, l_i, acc, q_t, q_ptr, q_off, row_ok, t_lo, t_hi,
    kc, ks, kz, ka, kb, koi, kov, kbk, kas, kbs, k_gs, k_g, k_r,
    vc, vs, vz, va, vb, voi, vov, vbk, vas, vbs, v_gs, v_g, v_r,
    D, K_W, V_W, scale_log2,
    K_BITS: tl.constexpr, K_PW: tl.constexpr, K_PC: tl.constexpr, K_MODE: tl.constexpr,
    K_LR: tl.constexpr, K_OUT: tl.constexpr,
    V_BITS: tl.constexpr, V_PW: tl.constexpr, V_PC: tl.constexpr, V_MODE: tl.constexpr,
    V_LR: tl.constexpr, V_OUT: tl.constexpr, LR_Q: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, R_P: tl.constexpr, R_G: tl.constexpr,
    BLOCK_O: tl.constexpr, BUCKET: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """Online-softmax state (m_i, l_i, acc^T) after tokens [t_lo, t_hi) of one compressed slice
    (one row's prompt, or one chunk of one row): pointers to its codes (K_W / V_W bytes a token),
    scales, zeros, low-rank factors (A rows of k_r columns; B of the slice, (D, k_r)), outliers,
    their buckets, and, int8 factors (LR_Q), the factors' column scales (k_r each)."""
    d = tl.arange(0, D_P)
    d_ok = d < D
    r = tl.arange(0, R_P)  # rank, padded to a tensor-core width
    cols = tl.arange(0, BLOCK_N)
    if K_LR:
        bk_t = tl.load(kb + d[None, :] * k_r + r[:, None], mask=d_ok[None, :] & (r < k_r)[:, None],
                       other=0.0).to(tl.float32)  # B^T (R_P, D_P)
        if LR_Q:
            bk_t = bk_t * tl.load(kbs + r, mask=r < k_r, other=0.0).to(tl.float32)[:, None]
            ka_s = tl.load(kas + r, mask=r < k_r, other=0.0).to(tl.float32)  # (R_P,)
        qb_t = tl.dot(bk_t, q_t.to(tl.float32), input_precision=PREC)  # (q B)^T (R_P, ROWS), once a slice
    if V_LR:
        acc_a = tl.zeros((R_P, ROWS), tl.float32)  # (P A)^T, rescaled with acc
        if LR_Q:
            va_s = tl.load(vas + r, mask=r < v_r, other=0.0).to(tl.float32)  # (R_P,)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        tok = t0 + cols
        t_ok = tok < t_hi
        t_end = tl.minimum(t0 + BLOCK_N, t_hi)
        # ---- scores^T (BLOCK_N, ROWS)
        k = _dequant_tile(kc, ks, kz, t0, t_hi, D, K_W, k_gs, k_g, K_BITS, K_PW, K_PC, K_MODE, BLOCK_N, D_P)
        s = tl.dot(k.to(DOT), q_t, input_precision=PREC)  # fp32 accumulation
        if K_LR:
            a = tl.load(ka + tok[:, None] * k_r + r[None, :], mask=t_ok[:, None] & (r < k_r)[None, :],
                        other=0.0).to(tl.float32)  # A tile (BLOCK_N, R_P)
            if LR_Q:
                a = a * ka_s[None, :]
            s += tl.dot(a, qb_t, input_precision=PREC)  # A (q B)^T: the rank-r part, never A B^T
        if K_OUT:
            o_lo = tl.load(kbk + t0 // BUCKET)
            o_hi = tl.load(kbk + (t_end + BUCKET - 1) // BUCKET)
            for o0 in range(o_lo, o_hi, BLOCK_O):
                ot, od, delta, ook = _outlier_block(koi, kov, o0, o_hi, kc, ks, kz, ka, kb, kas, kbs, D, K_W, k_gs,
                                                    k_g, k_r, k_r, k_r, K_BITS, K_PW, K_PC, K_LR, LR_Q, BLOCK_O, R_G)
                qd = tl.load(q_ptr + q_off[None, :] + od[:, None], mask=ook[:, None] & row_ok[None, :],
                             other=0.0).to(tl.float32)  # q[row, d] of each outlier (BLOCK_O, ROWS)
                onehot = (cols[:, None] == (ot - t0)[None, :]) & ook[None, :]  # (BLOCK_N, BLOCK_O)
                s += tl.dot(onehot.to(tl.float32), qd * delta[:, None], input_precision=PREC)
        # ---- online softmax over the tile's tokens (axis 0)
        s = tl.where(t_ok[:, None] & row_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[None, :])  # (BLOCK_N, ROWS)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :]
        m_i = m_new
        # ---- values: acc^T += V^T P^T
        v = _dequant_tile(vc, vs, vz, t0, t_hi, D, V_W, v_gs, v_g, V_BITS, V_PW, V_PC, V_MODE, BLOCK_N, D_P)
        p_dot = p.to(DOT)
        acc += tl.dot(tl.trans(v.to(DOT)), p_dot, input_precision=PREC)
        if V_LR:
            a_t = tl.load(va + tok[None, :] * v_r + r[:, None], mask=t_ok[None, :] & (r < v_r)[:, None],
                          other=0.0)  # A^T tile (R_P, BLOCK_N)
            if LR_Q:
                a_t = a_t.to(tl.float32) * va_s[:, None]
            acc_a = acc_a * alpha[None, :] + tl.dot(a_t.to(DOT), p_dot, input_precision=PREC)
        if V_OUT:
            o_lo = tl.load(vbk + t0 // BUCKET)
            o_hi = tl.load(vbk + (t_end + BUCKET - 1) // BUCKET)
            for o0 in range(o_lo, o_hi, BLOCK_O):
                ot, od, delta, ook = _outlier_block(voi, vov, o0, o_hi, vc, vs, vz, va, vb, vas, vbs, D, V_W, v_gs,
                                                    v_g, v_r, v_r, v_r, V_BITS, V_PW, V_PC, V_LR, LR_Q, BLOCK_O, R_G)
                pick = ((ot - t0)[:, None] == cols[None, :]) & ook[:, None]  # (BLOCK_O, BLOCK_N)
                pt = tl.dot(pick.to(tl.float32), p, input_precision=PREC)  # P[t of each outlier] (BLOCK_O, ROWS)
                put = (d[:, None] == od[None, :]) & ook[None, :]  # (D_P, BLOCK_O)
                acc += tl.dot(put.to(tl.float32), pt * delta[:, None], input_precision=PREC)
    if V_LR:
        bv = tl.load(vb + d[:, None] * v_r + r[None, :], mask=d_ok[:, None] & (r < v_r)[None, :],
                     other=0.0).to(tl.float32)  # B (D_P, R_P)
        if LR_Q:
            bv = bv * tl.load(vbs + r, mask=r < v_r, other=0.0).to(tl.float32)[None, :]
        acc += tl.dot(bv, acc_a, input_precision=PREC)  # ((P A) B^T)^T
    return m_i, l_i, acc


@triton.jit
def _attend_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr,
    # prompt part (varlen rows): per-row token, group, outlier and bucket offsets
    p_len, p_tok, p_grp, p_gsz, p_out, p_bkt,
    pkc, pks, pkz, pka, pkb, pkoi, pkov, pkbk, pkas, pkbs,
    pvc, pvs, pvz, pva, pvb, pvoi, pvov, pvbk, pvas, pvbs,
    N, PNG_K, PNG_V, P_OUT_N, P_BKT_N, pk_r, pv_r, pk_g, pv_g,
    # stream part (uniform chunks)
    skc, sks, skz, ska, skb, skoi, skov, skbk, skas, skbs,
    svc, svs, svz, sva, svb, svoi, svov, svbk, svas, svbs,
    NC, S, SNG_K, SNG_V, S_OUT_K, sk_r, sv_r, sk_g, sv_g,
    # exact buffer (batch, kv_heads, n_buf, D), last dim contiguous; row b's starts at its b_lead[b]
    kbuf, vbuf, bk_sb, bk_sh, bk_st, bv_sb, bv_sh, bv_st, NBUF, b_lead,
    D, K_W, V_W, H, QH, QL, RATIO, M, NRB, J, JP, JS, SPLIT_P, SPLIT_C, SPLIT_B, scale_log2,
    K_BITS: tl.constexpr, K_PW: tl.constexpr, K_PC: tl.constexpr, K_MODE: tl.constexpr, K_OUT: tl.constexpr,
    V_BITS: tl.constexpr, V_PW: tl.constexpr, V_PC: tl.constexpr, V_MODE: tl.constexpr, V_OUT: tl.constexpr,
    PK_LR: tl.constexpr, PV_LR: tl.constexpr, SK_LR: tl.constexpr, SV_LR: tl.constexpr, LR_Q: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, R_P: tl.constexpr, R_G: tl.constexpr,
    BLOCK_O: tl.constexpr, BUCKET: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    pid_w = tl.program_id(0)
    pid_1 = tl.program_id(1)
    b = pid_w // J
    j = pid_w % J
    h = pid_1 // NRB
    rb = pid_1 % NRB
    bh = b * H + h
    bh64 = bh.to(tl.int64)

    rows = rb * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    qi = rows % QL  # query index of each row; rows // QL is the member of the GQA group
    d = tl.arange(0, D_P)
    d_ok = d < D
    q_off = ((b.to(tl.int64) * QH + h * RATIO + rows // QL) * QL + qi) * D
    q_t = tl.load(q_ptr + q_off[None, :] + d[:, None], mask=d_ok[:, None] & row_ok[None, :],
                  other=0.0).to(DOT)  # (D_P, ROWS)

    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((D_P, ROWS), tl.float32)  # output^T
    h64 = h.to(tl.int64)
    if j < JP:  # a split of this row's prompt tokens
        length = tl.load(p_len + b)
        t_lo = j * SPLIT_P
        t_hi = tl.minimum(t_lo + SPLIT_P, length)
        if t_lo < t_hi:
            tok0 = tl.load(p_tok + b).to(tl.int64)  # the row's first token on the packed axis
            grp0 = tl.load(p_grp + b).to(tl.int64)
            gsz = tl.load(p_gsz + b)
            out0 = tl.load(p_out + b).to(tl.int64)
            bkt0 = tl.load(p_bkt + b).to(tl.int64)
            # per-channel scales are (H, D, NG): row b's groups start at grp0; per-token (H, N, NG)
            k_sc = (h64 * D * PNG_K + grp0) if K_PC else (h64 * N + tok0) * PNG_K
            v_sc = (h64 * D * PNG_V + grp0) if V_PC else (h64 * N + tok0) * PNG_V
            m_i, l_i, acc = _attend_slice(
                m_i, l_i, acc, q_t, q_ptr, q_off, row_ok, t_lo, t_hi,
                pkc + (h64 * N + tok0) * K_W, pks + k_sc, pkz + k_sc, pka + (h64 * N + tok0) * pk_r,
                pkb + bh64 * D * pk_r, pkoi + h64 * P_OUT_N + out0, pkov + h64 * P_OUT_N + out0,
                pkbk + h64 * P_BKT_N + bkt0, pkas + bh64 * pk_r, pkbs + bh64 * pk_r,
                PNG_K, pk_g if not K_PC else gsz, pk_r,
                pvc + (h64 * N + tok0) * V_W, pvs + v_sc, pvz + v_sc, pva + (h64 * N + tok0) * pv_r,
                pvb + bh64 * D * pv_r, pvoi + h64 * P_OUT_N + out0, pvov + h64 * P_OUT_N + out0,
                pvbk + h64 * P_BKT_N + bkt0, pvas + bh64 * pv_r, pvbs + bh64 * pv_r,
                PNG_V, pv_g if not V_PC else gsz, pv_r,
                D, K_W, V_W, scale_log2,
                K_BITS, K_PW, K_PC, K_MODE, PK_LR, K_OUT, V_BITS, V_PW, V_PC, V_MODE, PV_LR, V_OUT, LR_Q,
                ROWS, BLOCK_N, D_P, R_P, R_G, BLOCK_O, BUCKET, DOT, PREC,
            )
    elif j < JP + JS:  # a split of whole streamed chunks
        c_lo = (j - JP) * SPLIT_C
        c_hi = tl.minimum(c_lo + SPLIT_C, NC)
        for c in range(c_lo, c_hi):
            c64 = tl.cast(c, tl.int64)
            slot = bh64 * NC + c64  # (row, head, chunk)
            tok0 = (bh64 * NC + c64) * S  # the chunk's first token on its (row, head)'s axis
            k_sc = (bh64 * D * SNG_K * NC + c64 * SNG_K) if K_PC else tok0 * SNG_K
            v_sc = (bh64 * D * SNG_V * NC + c64 * SNG_V) if V_PC else tok0 * SNG_V
            n_bkt = (S + BUCKET - 1) // BUCKET + 1
            m_i, l_i, acc = _attend_slice(
                m_i, l_i, acc, q_t, q_ptr, q_off, row_ok, 0, S,
                skc + tok0 * K_W, sks + k_sc, skz + k_sc, ska + tok0 * sk_r, skb + slot * D * sk_r,
                skoi + slot * S_OUT_K, skov + slot * S_OUT_K, skbk + slot * n_bkt, skas + slot * sk_r, skbs + slot * sk_r,
                SNG_K * NC if K_PC else SNG_K, sk_g, sk_r,
                svc + tok0 * V_W, svs + v_sc, svz + v_sc, sva + tok0 * sv_r, svb + slot * D * sv_r,
                svoi + slot * S_OUT_K, svov + slot * S_OUT_K, svbk + slot * n_bkt, svas + slot * sv_r, svbs + slot * sv_r,
                SNG_V * NC if V_PC else SNG_V, sv_g, sv_r,
                D, K_W, V_W, scale_log2,
                K_BITS, K_PW, K_PC, K_MODE, SK_LR, K_OUT, V_BITS, V_PW, V_PC, V_MODE, SV_LR, V_OUT, LR_Q,
                ROWS, BLOCK_N, D_P, R_P, R_G, BLOCK_O, BUCKET, DOT, PREC,
            )
    else:  # a split of the exact buffer
        t_lo = (j - JP - JS) * SPLIT_B
        t_hi = tl.minimum(t_lo + SPLIT_B, NBUF)
        cols = tl.arange(0, BLOCK_N)
        lead = tl.load(b_lead + b)
        for t0 in range(t_lo, t_hi, BLOCK_N):
            tok = t0 + cols
            t_ok = (tok < t_hi) & (tok >= lead)
            kv_ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(kbuf + b.to(tl.int64) * bk_sb + h * bk_sh + tok[:, None] * bk_st + d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(k.to(DOT), q_t, input_precision=PREC)
            valid = t_ok[:, None] & row_ok[None, :]
            if CAUSAL:  # query i is the buffer's token NBUF - QL + i
                valid = valid & (tok[:, None] <= (NBUF - QL + qi)[None, :])
            s = tl.where(valid, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[None, :])
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[None, :]
            m_i = m_new
            v = tl.load(vbuf + b.to(tl.int64) * bv_sb + h * bv_sh + tok[:, None] * bv_st + d[None, :], mask=kv_ok, other=0.0)
            acc += tl.dot(tl.trans(v.to(DOT)), p.to(DOT), input_precision=PREC)

    M_TOT = NRB * ROWS
    out = ((b.to(tl.int64) * J + j) * H + h) * M_TOT + rows  # every program writes its slot
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out[None, :] * D_P + d[:, None], acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, J, D, H, QH, QL, RATIO, M, NRB,
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
    for j in range(0, J):
        slot = ((b.to(tl.int64) * J + j) * H + h) * M_TOT + rows
        m_s = tl.load(m_ptr + slot)
        l_s = tl.load(l_ptr + slot)
        a_s = tl.load(acc_ptr + slot[:, None] * D_P + d[None, :])
        live = l_s != 0  # an empty work item adds nothing; NaN propagates
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


# ------------------------------------------------------------------------------ host side


def _mode(part_group_ok: bool, bits: int, dim: int, per_channel: bool, group: int) -> int:
    """How _dequant_tile reads a side (see there): 0 gather, 1 whole bytes, 2 bytes + one group."""
    pw = CODES_PER_WORD[bits]
    if bits == 3 or dim % pw or (not per_channel and group % pw):
        return 0
    return 2 if per_channel and part_group_ok else 1


def _check_sorted(index: torch.Tensor) -> None:
    if index.shape[-1] > 1 and (index.device.type != "cuda" or CHECK_OUTLIER_ORDER):
        i = index.long()
        assert bool((i[..., 1:] >= i[..., :-1]).all()), \
            "outlier_index must be sorted ascending in every slice (as gear_kernels.compress stores it)"


def _pointers(part, dummies: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A part's tensors in the kernels' order (codes, scale, zero, A, B, outlier index, values,
    buckets, A's and B's column scales); dummies of the right types where it has none (never
    read, but compiled)."""
    names = ("codes", "scale", "zero", "lowrank_a", "lowrank_b", "outlier_index", "outlier_values", "outlier_bucket",
             "lowrank_a_scale", "lowrank_b_scale")
    return [dummies[n] if part is None or getattr(part, n) is None else getattr(part, n) for n in names]


def _check_sorted_rows(part: PromptPart) -> None:
    """Each row's outliers are sorted within the row (checked on CPU; on CUDA when asked)."""
    if part.outlier_index is None or (part.codes.device.type == "cuda" and not CHECK_OUTLIER_ORDER):
        return
    start = 0
    for count in part.outlier_counts.tolist():
        _check_sorted(part.outlier_index[:, start : start + count])
        start += count


def _sizes(part) -> dict:
    """The kernels' integers of a part: groups a slice (per-channel: of the whole part for the
    prompt, a chunk for the stream), outliers a slice, buckets, rank, group size."""
    if part is None:
        return dict(ng=1, n_out=0, n_bkt=0, rank=1, group=1, lr=False)
    lr, has_out = part.lowrank_a is not None, part.outlier_values is not None
    groups = part.scale.shape[-1]
    if isinstance(part, StreamPart) and part.per_channel:
        groups //= part.chunks
    return dict(ng=groups, n_out=part.outlier_values.shape[-1] if has_out else 0,
                n_bkt=part.outlier_bucket.shape[-1] if has_out else 0,
                rank=part.lowrank_a.shape[-1] if lr else 1, group=part.group, lr=lr)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return (torch.cumsum(counts, 0) - counts).to(torch.int64)


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
    """
    p = check_decode_inputs(q, store, k_buf, v_buf, scale)
    dev = q.device
    lead = torch.zeros(p.batch, dtype=torch.int64)  # (batch,) buffer slots a row skips
    if store is not None and store.sinks is not None:
        k_buf, v_buf, lead = sinks_before_buffer(store, k_buf, v_buf)
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
    dot = tl.float32 if full else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype]
    prec = "ieee" if full else "tf32"

    prompt_k = prompt_v = stream_k = stream_v = None
    if store is not None:
        prompt_k, prompt_v, stream_k, stream_v = store.prompt_keys, store.prompt_values, store.stream_keys, store.stream_values
    ref = next((part for part in (prompt_k, stream_k) if part is not None), None)
    ints = torch.zeros(1, dtype=torch.int32, device=dev)
    dummies = dict(codes=torch.zeros(1, dtype=torch.uint8, device=dev), scale=q, zero=q, lowrank_a=q, lowrank_b=q,
                   outlier_index=ints, outlier_values=q, outlier_bucket=ints, lowrank_a_scale=q, lowrank_b_scale=q)
    for part in (prompt_k, prompt_v):
        if part is not None:
            _check_sorted_rows(part)
    for part in (stream_k, stream_v):
        if part is not None and part.outlier_index is not None:
            _check_sorted(part.outlier_index)
    pk, pv, sk, sv = (_pointers(part, dummies) for part in (prompt_k, prompt_v, stream_k, stream_v))
    pk_i, pv_i, sk_i, sv_i = (_sizes(part) for part in (prompt_k, prompt_v, stream_k, stream_v))
    for part in (prompt_k, prompt_v, stream_k, stream_v):
        for t in ([] if part is None else part.tensors()):
            assert t.is_contiguous(), "store tensors must be contiguous (the kernels index them densely)"

    # work per row: prompt splits, stream splits (whole chunks), buffer splits
    longest = int(prompt_k.lengths.max()) if prompt_k is not None else 0
    n_chunks = stream_k.chunks if stream_k is not None else 0
    chunk_tokens = stream_k.chunk_tokens if stream_k is not None else 1
    programs = p.batch * p.kv_heads * nrb
    if split_tokens is not None:
        per = split_tokens
    elif small:
        per = max(longest, n_chunks * chunk_tokens, n_buf, 1)
    else:
        wanted = TUNING["programs_per_sm"] * td.num_sms(dev)
        per = triton.cdiv(longest + n_chunks * chunk_tokens + n_buf, max(1, wanted // programs))
    split_p = max(block_n, triton.cdiv(per, block_n) * block_n)
    split_c = max(1, per // chunk_tokens)
    split_b = split_p
    jp = triton.cdiv(longest, split_p) if prompt_k is not None else 0
    js = triton.cdiv(n_chunks, split_c)
    jb = triton.cdiv(n_buf, split_b)
    n_work = jp + js + jb

    # per-row offsets of the prompt part (int64 on the device)
    if prompt_k is not None:
        # per-row offsets on the packed axes; values are grouped per token in every backbone, so
        # the per-channel group offsets and sizes are the keys'
        lengths = prompt_k.lengths
        p_len = lengths.to(dev, torch.int64)
        p_tok = _offsets(lengths).to(dev)
        p_grp = _offsets(-(-lengths // prompt_k.group_sizes)).to(dev)
        p_gsz = prompt_k.group_sizes.to(dev, torch.int64)
        has_out = prompt_k.outlier_values is not None
        p_out = _offsets(prompt_k.outlier_counts).to(dev) if has_out else p_tok
        p_bkt = _offsets(prompt_k.bucket_counts()).to(dev) if has_out else p_tok
        n_tokens = int(lengths.sum())
    else:
        p_len = p_tok = p_grp = p_gsz = p_out = p_bkt = torch.zeros(p.batch, dtype=torch.int64, device=dev)
        n_tokens = 0
    if k_buf is not None:
        kb_, vb_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_buf, v_buf))
        buf_strides = [kb_.stride(0), kb_.stride(1), kb_.stride(2), vb_.stride(0), vb_.stride(1), vb_.stride(2)]
    else:
        kb_ = vb_ = q
        buf_strides = [0] * 6
    # keys and values may have their own widths (key_bits, value_bits): each side reads its own
    ref_k, ref_v = prompt_k or stream_k, prompt_v or stream_v
    k_bits, v_bits = (side.bits if side is not None else 2 for side in (ref_k, ref_v))
    k_w, v_w = (side.codes.shape[-1] if side is not None else 1 for side in (ref_k, ref_v))
    k_pc = (prompt_k or stream_k).per_channel if ref is not None else False
    v_pc = (prompt_v or stream_v).per_channel if ref is not None else False

    def group_ok(kind_parts) -> bool:
        """Every tile of every slice lies in one per-channel group (MODE 2)."""
        ok = True
        for part in kind_parts:
            if part is None or not part.per_channel:
                continue
            if isinstance(part, PromptPart):
                ok &= bool(((part.group_sizes % block_n == 0) | (part.group_sizes >= part.lengths)).all())
            else:
                ok &= part.group % block_n == 0 or part.group >= part.chunk_tokens
        return ok

    k_mode = _mode(group_ok((prompt_k, stream_k)), k_bits, p.head_dim, k_pc, ref_k.group if ref else 1)
    v_mode = _mode(group_ok((prompt_v, stream_v)), v_bits, p.head_dim, v_pc, ref_v.group if ref else 1)
    lr_q = ref is not None and ref_k.lowrank_a_scale is not None
    has_out = ref is not None and (prompt_k or stream_k).outlier_values is not None
    rank = max(pk_i["rank"], pv_i["rank"], sk_i["rank"], sv_i["rank"])

    m_tot = nrb * rows
    scratch = torch.full if POISON else (lambda shape, _fill, **kw: torch.empty(shape, **kw))
    m = scratch((p.batch, n_work, p.kv_heads, m_tot), float("nan"), dtype=torch.float32, device=dev)
    l = scratch((p.batch, n_work, p.kv_heads, m_tot), float("nan"), dtype=torch.float32, device=dev)
    acc = scratch((p.batch, n_work, p.kv_heads, m_tot, d_p), float("nan"), dtype=torch.float32, device=dev)
    _attend_kernel[(p.batch * n_work, p.kv_heads * nrb)](
        q, m, l, acc,
        p_len, p_tok, p_grp, p_gsz, p_out, p_bkt,
        *pk, *pv,
        n_tokens, pk_i["ng"], pv_i["ng"], pk_i["n_out"], pk_i["n_bkt"], pk_i["rank"], pv_i["rank"],
        pk_i["group"], pv_i["group"],
        *sk, *sv,
        n_chunks, chunk_tokens, sk_i["ng"], sv_i["ng"], sk_i["n_out"], sk_i["rank"], sv_i["rank"],
        sk_i["group"], sv_i["group"],
        kb_, vb_, *buf_strides, n_buf, lead.to(dev, torch.int64),
        p.head_dim, k_w, v_w, p.kv_heads, p.q_heads, p.q_len, p.ratio, rows_total, nrb, n_work, jp, js,
        split_p, split_c, split_b, float(scale) * LOG2E,
        K_BITS=k_bits, K_PW=CODES_PER_WORD[k_bits], K_PC=k_pc, K_MODE=k_mode, K_OUT=has_out,
        V_BITS=v_bits, V_PW=CODES_PER_WORD[v_bits], V_PC=v_pc, V_MODE=v_mode, V_OUT=has_out,
        PK_LR=pk_i["lr"], PV_LR=pv_i["lr"], SK_LR=sk_i["lr"], SV_LR=sv_i["lr"], LR_Q=lr_q, CAUSAL=p.q_len > 1,
        ROWS=rows, BLOCK_N=block_n, D_P=d_p, R_P=max(16, _pow2(rank)), R_G=max(2, _pow2(rank)),
        BLOCK_O=block_o, BUCKET=BUCKET, DOT=dot, PREC=prec,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == dev and out.is_contiguous(), \
            "out must be a contiguous tensor like q"
    _merge_kernel[(p.batch * p.kv_heads, nrb)](m, l, acc, out, n_work, p.head_dim, p.kv_heads, p.q_heads, p.q_len,
                                               p.ratio, rows_total, nrb, ROWS=rows, D_P=d_p, num_warps=4)
    return out
