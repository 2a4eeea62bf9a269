"""TurboQuant's MSE quantizer: its codebook, encode/decode, its error against the peer package
fused_turboquant, and its Triton tile against decode, bit for bit (in the interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported (the module imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gear_kernels.packing import packed_length  # noqa: E402
from gear_kernels.quantizers import turboquant as tq  # noqa: E402
from gear_kernels.quantizers.base import QUANTIZERS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (2, 3, 4)
# Gaussian Lloyd-Max centroids (Max 1960), the positive half: the large-D limit times sqrt(D)
GAUSSIAN = {2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
            4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}


def _random(shape, seed, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_codebook_is_lloyd_max_for_the_coordinate_density(bits, head_dim):
    """Ascending, exactly symmetric, and each centroid the mean of its cell (edges: midpoints)
    under the exact density, integrated here independently of the module's grid."""
    from scipy.integrate import quad

    book = tq.codebook(bits, head_dim)
    assert book.dtype == torch.float32 and book.shape == (1 << bits,)
    assert (book.diff() > 0).all() and torch.equal(book, -book.flip(0))
    assert tq.codebook(bits, head_dim) is book  # cached
    edges = [-1.0, *tq.midpoints(book).double().tolist(), 1.0]
    density = lambda t: (1 - t * t) ** ((head_dim - 3) / 2)  # noqa: E731
    for c, lo, hi in zip(book.tolist(), edges[:-1], edges[1:]):
        mean = quad(lambda t: t * density(t), lo, hi, epsabs=0)[0] / quad(density, lo, hi, epsabs=0)[0]
        assert abs(c - mean) < 2e-6, (c, mean)


@pytest.mark.parametrize("bits", BITS)
def test_codebook_tends_to_gaussian_lloyd_max(bits):
    scaled = tq.codebook(bits, 4096)[1 << (bits - 1):] * 4096**0.5
    torch.testing.assert_close(scaled, torch.tensor(GAUSSIAN[bits]), atol=0, rtol=1.5e-3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [64, 37])
def test_round_trip_codes_each_entry_to_its_nearest_grid_point(bits, head_dim):
    q = QUANTIZERS["turboquant"](bits=bits)
    x = _random((3, 5, head_dim), seed=bits)
    parts = q.encode(x, None)
    assert parts["codes"].shape == (3, 5, packed_length(head_dim, bits)) and parts["codes"].dtype == torch.uint8
    assert parts["norm"].shape == (3, 5, 1) and parts["norm"].dtype == torch.float16
    torch.testing.assert_close(parts["norm"].float(), x.norm(dim=-1, keepdim=True), rtol=2**-11, atol=0)
    out = q.decode(parts, head_dim)
    assert out.shape == x.shape and out.dtype == torch.float32
    grid = tq.codebook(bits, head_dim) * parts["norm"].float()[..., None]  # (3, 5, 1, 2^bits)
    nearest = (x[..., None] - grid).abs().min(dim=-1).values
    assert ((x - out).abs() <= nearest * (1 + 1e-5) + 1e-6).all()
    again = q.encode(x[1:2], None)  # deterministic, and a row codes alike whatever surrounds it
    assert all(torch.equal(again[k], parts[k][1:2]) for k in parts)


@pytest.mark.parametrize("bits", BITS)
def test_excluded_entries_shape_nothing(bits):
    q = tq.TurboQuant(bits)
    x = _random((2, 7, 64), seed=10)
    exclude = torch.rand(x.shape, generator=torch.Generator().manual_seed(11)) < 0.1
    zeroed = q.encode(x.masked_fill(exclude, 0.0), None)
    huge = q.encode(x.masked_fill(exclude, 1e30), exclude)  # beyond fp16, were it counted
    assert all(torch.equal(huge[k], zeroed[k]) for k in zeroed)


@pytest.mark.parametrize("bits", BITS)
def test_zero_and_tiny_vectors_decode_to_zero(bits):
    q = tq.TurboQuant(bits)
    x = _random((1, 4, 48), seed=12)
    x[0, 1] = 0.0
    x[0, 2] = 1e-30  # its norm underflows fp16
    out = q.decode(q.encode(x, None), 48)
    assert torch.isfinite(out).all() and (out[0, 1:3] == 0).all() and (out[0, [0, 3]] != 0).any()


@pytest.mark.parametrize("bad", [1e5, float("inf"), float("nan")])
def test_norm_beyond_fp16_is_refused(bad):
    x = _random((2, 3, 64), seed=13)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="fp16.*method=none"):
        tq.TurboQuant(4).encode(x, None)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_error_matches_fused_turboquant(bits, head_dim):
    """Mean squared error of unit vectors against the peer's TurboQuantMSE (CPU path, its own
    rotation inside), on the same Gaussian vectors: ours is fed them after the peer's rotation,
    as the project rotates before quantizing."""
    from fused_turboquant.core.quantizer import TurboQuantMSE

    peer = TurboQuantMSE(head_dim=head_dim, bits=bits, seed=0, device="cpu")
    u = _random((4096, head_dim), seed=14)
    u = u / u.norm(dim=-1, keepdim=True)
    peer_mse = (peer.roundtrip(u) - u).square().sum(-1).mean().item()
    rotated = peer.rotation(u)
    q = tq.TurboQuant(bits)
    ours = (q.decode(q.encode(rotated[None], None), head_dim)[0] - rotated).square().sum(-1).mean().item()
    print(f"bits={bits} D={head_dim}: ours {ours:.5f}, fused_turboquant {peer_mse:.5f}")
    assert abs(ours / peer_mse - 1) < 0.1, (ours, peer_mse)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:

    @triton.jit
    def _tile_kernel(codes_ptr, norm_ptr, book_ptr, tok_ptr, ok_ptr, out_ptr, D, W,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr):
        """One tile of the tokens listed at tok_ptr (those with ok_ptr set), to out (BLOCK_N, D_P)."""
        n = tl.arange(0, BLOCK_N)
        tok = tl.load(tok_ptr + n)
        ok = tl.load(ok_ptr + n) != 0
        tile = tq.dequant_tile(codes_ptr + tok * W, norm_ptr + tok, book_ptr, ok, D, W, BITS, BLOCK_N, D_P)
        tl.store(out_ptr + n[:, None] * D_P + tl.arange(0, D_P)[None, :], tile)


@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [64, 48, 37])
def test_triton_tile_is_decode_bit_for_bit(bits, head_dim):
    tokens, block_n, d_p = 40, 16, 64
    q = tq.TurboQuant(bits)
    parts = q.encode(_random((1, tokens, head_dim), seed=20 + head_dim + bits), None)
    codes, norm = parts["codes"][0].to(DEVICE), parts["norm"][0].to(DEVICE)  # (T, W), (T, 1)
    g = torch.Generator().manual_seed(bits)
    tok = torch.randperm(tokens, generator=g)[:block_n].to(torch.int32)
    ok = torch.rand(block_n, generator=g) < 0.7
    ok[:2] = torch.tensor([True, False])
    book = tq.codebook(bits, head_dim).to(DEVICE)
    out = torch.full((block_n, d_p), float("nan"), device=DEVICE)
    _tile_kernel[(1,)](codes, norm, book, tok.to(DEVICE), ok.to(torch.int8).to(DEVICE), out,
                       head_dim, codes.shape[1], BITS=bits, BLOCK_N=block_n, D_P=d_p)
    want = torch.zeros(block_n, d_p)
    want[ok, :head_dim] = q.decode(parts, head_dim)[0][tok[ok].long()]
    assert want[ok].abs().sum(dim=1).min() > 0
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))
