"""The one place that picks Triton or torch: kernel = "auto" | "triton" | "torch".

auto means triton for CUDA tensors (when triton imports) and torch elsewhere. "triton" on CPU
tensors runs only under TRITON_INTERPRET=1 (tests); otherwise it raises. Triton modules are
imported lazily, so gear_kernels works on machines without triton.

    decode_attention(q, store, k_buf, v_buf, scale, kernel="auto")
    compress(x, config, kind, rank=None, kernel=None)   # kernel defaults to config.kernel

Both paths of each function compute the same thing: decode_attention is the packed torch path
(attention_reference.py) or the packed Triton path (triton_attention.py), both reading the store
itself; compress is chunk.py or triton_quantize.py. (The third attention path, rebuilt, is
lm_eval_gear.cache's working copy read by transformers' SDPA: nothing here.)
"""

from __future__ import annotations

import torch

from .attention_reference import decode_attention_torch
from .chunk import CompressedChunk
from .chunk import compress as compress_torch
from .config import KERNELS, GearConfig
from .store import KVStore
from .triton_device import check_device


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """'auto' | 'triton' | 'torch' -> the path that runs ('triton' or 'torch') for `device`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: allowed {', '.join(KERNELS)}")
    if kernel == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if kernel == "triton" and not triton_available():
        raise ValueError("kernel='triton' needs the triton package; install it or use kernel='torch'")
    return kernel


def decode_attention(
    q: torch.Tensor,
    store: KVStore | None,
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    scale: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of q over a compressed layer cache: (batch, q_heads, q_len, head_dim) in q's dtype.

    q (batch, q_heads, q_len, head_dim); store: the layer's KVStore (its prompt rows, then its
    streamed chunks) or None; k_buf / v_buf the exact buffer (batch, kv_heads, n_buf, head_dim)
    or None; scale the softmax scale. q_len > 1: the queries are the buffer's last q_len
    tokens, causally masked. GQA: q_heads = kv_heads * ratio, never repeating K/V. See
    attention_reference.py for the exact contract.
    """
    if resolve_kernel(kernel, q.device) == "torch":
        return decode_attention_torch(q, store, k_buf, v_buf, scale)
    from .triton_attention import decode_attention_triton

    return decode_attention_triton(q, store, k_buf, v_buf, scale)


def compress(x: torch.Tensor, config: GearConfig, kind: str, rank: int | None = None,
             kernel: str | None = None) -> CompressedChunk:
    """gear_kernels.compress (DESIGN.md section 4): chunk.compress, with the quantizer's Triton
    encode when the kernel resolves to triton (and the quantizer has one): the same stored
    tensors either way (see triton_quantize). kernel="triton" on tensors Triton cannot run on
    raises here, before any work is done.
    """
    path = resolve_kernel(config.kernel if kernel is None else kernel, x.device)
    if path == "triton":
        check_device(x.device)
    return compress_torch(x, config, kind, rank, path)
