"""The randomized Walsh-Hadamard rotation (gear_kernels.rotation) is orthogonal and leaves
attention unchanged when the query is rotated alike and the output rotated back."""

from __future__ import annotations

import pytest
import torch

from gear_kernels.rotation import hadamard_signs, rotate, unrotate


def _sylvester(d: int) -> torch.Tensor:
    """The d x d Walsh-Hadamard matrix, built independently of the butterflies under test."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("head_dim", [1, 2, 16, 64, 128])
def test_rotation_is_the_signed_hadamard_matrix(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(2, 3, 7, head_dim, generator=g)
    signs = hadamard_signs(head_dim, seed=5)
    matrix = torch.diag(signs) @ _sylvester(head_dim) / head_dim**0.5  # (d, d), orthogonal
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(x, signs), x @ matrix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate(rotate(x, signs), signs), x, atol=1e-5, rtol=1e-5)


def test_signs_are_seeded():
    assert torch.equal(hadamard_signs(64, 3), hadamard_signs(64, 3))
    assert not torch.equal(hadamard_signs(64, 3), hadamard_signs(64, 4))
    assert set(hadamard_signs(64, 3).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_rotated_keys_and_values_is_unchanged(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, generator=g).to(dtype) for n in (3, 37, 37))
    signs = hadamard_signs(64, seed=1)
    plain = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rotated = torch.nn.functional.scaled_dot_product_attention(
        rotate(q, signs), rotate(k, signs), rotate(v, signs))  # in dtype
    assert rotated.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the rotated entries are rounded once more
    torch.testing.assert_close(unrotate(rotated, signs).float(), plain, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("head_dim", [0, 3, 80, 96])
def test_head_dim_not_a_power_of_two_is_refused(head_dim):
    with pytest.raises(ValueError, match=f"power-of-two head_dim, this model has {head_dim}.*rotation=none"):
        hadamard_signs(head_dim, seed=0)


def test_rotation_spreads_outlying_channels_over_the_groups():
    """Values quantized per token: two channels 30x the others stretch every token's range;
    rotated, the same bits reconstruct them with a smaller error."""
    from gear_kernels import GearConfig, compress, decompress

    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 40, 64, generator=g)
    v[..., [3, 17]] *= 30
    config = GearConfig(method="kivi", bits=2)
    signs = hadamard_signs(64, seed=0)
    plain = decompress(compress(v, config, "value"))
    rotated = unrotate(decompress(compress(rotate(v, signs), config, "value")), signs)
    assert (rotated - v).norm() < 0.7 * (plain - v).norm()


def test_the_cache_refuses_rotation_without_a_power_of_two_head_dim():
    from lm_eval_gear import GearCache
    from tiny_models import tiny_model

    _, config = tiny_model("llama", head_dim=24)
    with pytest.raises(ValueError, match="power-of-two head_dim, this model has 24"):
        GearCache({"method": "kivi", "rotation": "hadamard"}, config)
    GearCache({"method": "kivi"}, config)  # unrotated, any head_dim


def test_rotation_belongs_to_the_quantizing_methods():
    from gear_kernels import GearConfig, GearConfigError

    for method in ("kivi", "gear-l", "gear"):
        assert GearConfig.from_options({"method": method, "rotation": "hadamard"}).codec.rotation == "hadamard"
    with pytest.raises(GearConfigError, match="method 'none' does not use rotation"):
        GearConfig.from_options({"method": "none", "rotation": "hadamard"})
    with pytest.raises(GearConfigError, match="rotation='qr'"):
        GearConfig.from_options({"method": "kivi", "rotation": "qr"})
