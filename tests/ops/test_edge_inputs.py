"""Edge inputs that used to fail or crash (issue 15's bad-input list, the CPU side): zero tokens
run and change nothing, a 0-d input gets an error naming it, bad cu_seq_lens values are refused
before anything is written, FlashInfer's HND caches (two halves of one allocation) are taken."""

import pytest
import torch

from compile_ops.testing import assert_raises_eager_and_fake, rope_cos_sin_cache

ops = torch.ops.compile_ops


@pytest.mark.parametrize("shape3", [False, True])
@pytest.mark.parametrize("with_key", [True, False])
def test_rotary_embedding_zero_tokens(shape3, with_key):
    pos = torch.zeros(0, dtype=torch.long)
    q = torch.zeros(0, 4, 64) if shape3 else torch.zeros(0, 4 * 64)
    k = (torch.zeros(0, 2, 64) if shape3 else torch.zeros(0, 2 * 64)) if with_key else None
    ops.rotary_embedding(pos, q, k, 64, rope_cos_sin_cache(100, 64), True)  # used to raise
    assert q.numel() == 0


def test_fused_rope_and_cache_flash_zero_tokens():
    kc, vc = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    before = (kc.clone(), vc.clone())
    pos = torch.zeros(0, dtype=torch.long)
    ops.fused_rope_and_cache_flash(pos, torch.zeros(0, 4, 64), torch.zeros(0, 2, 64),
                                   torch.zeros(0, 2, 64), 64, rope_cos_sin_cache(100, 64), True,
                                   kc, vc, torch.zeros(0, dtype=torch.long), "auto",
                                   torch.tensor(1.0), torch.tensor(1.0))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_rms_norm_zero_dim_input_is_named():
    x = torch.tensor(1.0)
    assert_raises_eager_and_fake(lambda: ops.rms_norm(torch.empty(()), x, torch.ones(1), 1e-6),
                                 ValueError, "input must have at least one dimension")
    assert_raises_eager_and_fake(
        lambda: ops.fused_add_rms_norm(x.clone(), x.clone(), torch.ones(1), 1e-6), ValueError,
        "input must have at least one dimension")


@pytest.mark.parametrize("cu,match", [([-2, 5, 9], r"cu_seq_lens\[0\] = -2 is negative"),
                                      ([0, 9, 5], "cu_seq_lens must not decrease")])
def test_cp_gather_cache_bad_offsets_raise_before_writing(cu, match):
    src = torch.randn(4, 16, 8)
    dst = torch.full((20, 8), 7.0)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(IndexError, match=match):
        ops.cp_gather_cache(src, dst, table, torch.tensor(cu, dtype=torch.int32), 2)
    assert (dst == 7).all()


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_reshape_and_cache_flash_hnd_halves_of_one_cache(kv):
    """key_cache = kv[:, 0], value_cache = kv[:, 1] of one [blocks, 2, heads, block, head] cache
    (FlashInfer's HND layout), as flash-layout views: accepted (the overlap check took them for
    overlapping before) and written as two separate HND caches would be."""
    g = torch.Generator().manual_seed(0)
    nb, heads, bs, hs = 5, 2, 16, 64
    cdt = torch.bfloat16 if kv == "auto" else torch.uint8
    kvc = torch.zeros(nb, 2, heads, bs, hs, dtype=cdt)
    key_cache, value_cache = kvc[:, 0].permute(0, 2, 1, 3), kvc[:, 1].permute(0, 2, 1, 3)
    sep_k = torch.zeros(nb, heads, bs, hs, dtype=cdt).permute(0, 2, 1, 3)
    sep_v = torch.zeros(nb, heads, bs, hs, dtype=cdt).permute(0, 2, 1, 3)
    key = torch.randn(7, heads, hs, generator=g).to(torch.bfloat16)
    value = torch.randn(7, heads, hs, generator=g).to(torch.bfloat16)
    slots = torch.tensor([0, 3, 17, -1, 40, 79, 33])
    one = torch.tensor(1.0)
    ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slots, kv, one, one)
    ops.reshape_and_cache_flash(key, value, sep_k, sep_v, slots, kv, one, one)
    assert torch.equal(key_cache, sep_k) and torch.equal(value_cache, sep_v)
    assert key_cache.abs().sum() > 0 and value_cache.abs().sum() > 0
    with pytest.raises(ValueError, match="overlap in memory"):  # the same half twice: refused
        ops.reshape_and_cache_flash(key, value, key_cache, key_cache, slots, kv, one, one)
