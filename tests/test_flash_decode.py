"""The Triton flash-decoding kernel against the softmax formula written out (on a CPU through
Triton's interpreter, which conftest switches on; on a GPU as compiled)."""

import os

import pytest
import torch

pytest.importorskip("triton")
from dash_prefill.hf.flash_decode import MIN_KEYS_PER_PART, flash_decode, parts_for  # noqa: E402

CUDA = os.environ.get("DASH_TEST_DEVICE") == "cuda"


def written_out(grouped, key, value, mask, scale):
    """Per row, key head and query: softmax over the allowed keys, then the weighted values (float64)."""
    batch, kv_heads, groups, dim = grouped.shape
    out = torch.empty(batch, kv_heads, groups, dim, dtype=torch.float64, device="cpu")
    for b in range(batch):
        allowed = torch.ones(key.shape[2], dtype=torch.bool, device="cpu") if mask is None else mask[min(b, mask.shape[0] - 1), 0, 0].cpu()
        for h in range(kv_heads):
            keys, values = key[b, h].cpu().double()[allowed], value[b, h].cpu().double()[allowed]
            for g in range(groups):
                logits = keys @ grouped[b, h, g].cpu().double() * scale
                weights = torch.exp(logits - logits.max())
                out[b, h, g] = weights @ values / weights.sum()
    return out


CASES = {  # batch, kv_heads, groups, dim, keys, parts
    "gqa-4-in-3-parts": (2, 2, 4, 64, 1000, 3),
    "odd-groups-and-dim": (1, 2, 3, 96, 777, 2),
    "one-part": (1, 1, 8, 32, 300, 1),
    "default-parts": (2, 2, 2, 16, 700, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", ["none", "per-row", "shared"])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_decode_equals_the_softmax_formula(case, masked, dtype):
    batch, kv_heads, groups, dim, keys, parts = CASES[case]
    torch.manual_seed(0)
    grouped = torch.randn(batch, kv_heads, groups, dim, dtype=dtype)
    key, value = torch.randn(batch, kv_heads, keys, dim, dtype=dtype), torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
    mask = None if masked == "none" else torch.rand(batch if masked == "per-row" else 1, 1, 1, keys) > 0.4
    if mask is not None:
        mask[..., : keys // 2] = False  # whole parts without a key that counts
        mask[..., -1] = True
    scale = dim ** -0.5
    got = flash_decode(grouped, key, value, mask, scale, parts=parts)
    assert got.shape == grouped.shape and got.dtype == dtype
    expected = written_out(grouped, key, value, mask, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.cpu().double(), expected, atol=tolerance, rtol=tolerance)
    if mask is not None:  # the mask is obeyed: without it the answer differs
        assert not torch.allclose(got.cpu().double(), written_out(grouped, key, value, None, scale), atol=1e-2)


def test_flash_decode_reads_strided_queries_and_a_cache_longer_than_its_keys():
    torch.manual_seed(1)
    query = torch.randn(1, 1, 8, 32).transpose(1, 2)  # (batch, heads, 1, dim) as HF's attention holds it
    grouped = query.reshape(1, 8, 32).view(1, 2, 4, 32)
    buffer = torch.randn(2, 1, 2, 512, 32)  # keys and values as slices of one buffer: strided rows
    key, value = buffer[0, :, :, :300], buffer[1, :, :, :300]
    got = flash_decode(grouped, key, value, None, 0.2, parts=2)
    torch.testing.assert_close(got.cpu().double(), written_out(grouped, key, value, None, 0.2), atol=1e-5, rtol=1e-5)


def test_parts_give_two_programs_per_sm_and_keep_a_minimum_of_keys():
    assert parts_for(8, 32768, 132) == 33  # 8 key heads x 33 parts = two programs on each of 132 SMs
    assert parts_for(8, 8192, 132) == 32  # at least MIN_KEYS_PER_PART keys a part
    assert parts_for(64, 1 << 20, 132) == 5  # a batch of 8 needs fewer parts
    assert parts_for(8, MIN_KEYS_PER_PART - 1, 132) == 1


@pytest.mark.skipif(not CUDA, reason="bfloat16 needs a GPU (Triton's interpreter mishandles it)")
def test_flash_decode_in_bfloat16_on_a_gpu_matches_float32():
    torch.manual_seed(2)
    grouped, key, value = torch.randn(1, 8, 4, 128), torch.randn(1, 8, 33000, 128), torch.randn(1, 8, 33000, 128)
    mask = torch.rand(1, 1, 1, 33000) > 0.1
    low = flash_decode(grouped.bfloat16(), key.bfloat16(), value.bfloat16(), mask, 128 ** -0.5)
    high = flash_decode(grouped, key, value, mask, 128 ** -0.5)
    torch.testing.assert_close(low.float(), high, atol=2e-2, rtol=2e-2)


def test_flash_decode_offsets_past_two_to_the_31_elements_reach_the_right_keys():
    """Row 2 of keys with a 2**30-element batch stride starts at element 2**31: in int32 offset
    arithmetic it wraps to -2**31 and the kernel would read the decoy written there instead.
    One 8 GiB (float16) buffer, allocated but untouched except for the rows read."""
    batch, dim, keys, stride = 3, 16, 32, 1 << 30
    storage = torch.empty((1 << 31) + 2 * stride + keys * dim, dtype=torch.float16)
    key = storage[1 << 31:].as_strided((batch, 1, keys, dim), (stride, keys * dim, dim, 1))
    torch.manual_seed(3)
    for b in range(batch):
        key[b].copy_(torch.randn(1, keys, dim))
    storage[:keys * dim].copy_(torch.randn(keys * dim) * 10)  # the decoy where int32 offsets wrap to
    grouped = torch.randn(batch, 1, 2, dim, dtype=torch.float16)
    value = torch.randn(batch, 1, keys, dim, dtype=torch.float16)
    got = flash_decode(grouped, key, value, None, dim ** -0.5, parts=1, block_keys=32)
    expected = written_out(grouped, key, value, None, dim ** -0.5)
    torch.testing.assert_close(got.cpu().double(), expected, atol=2e-3, rtol=2e-3)
