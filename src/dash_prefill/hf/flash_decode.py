"""Attention of one query per row in Triton, split over the keys (flash-decoding).

Decoding reads every cached key and value once per token; with one query per row the products
have too few outputs to occupy a GPU, so the keys are split into parts, each part's program
keeps an online softmax over its keys (scores in float32, never written out) and a second
kernel joins the parts by their log-sum-exp. The query heads that share a key head (GQA) are
one program's rows, so keys and values are read once. ``flash_decode`` runs wherever Triton
runs (CUDA, or its CPU interpreter under ``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton decode with torch's products
    triton = None

available = triton is not None

# Keys a program reads per step, and a part's keys at least. Measured on an H200 (scripts/
# probe_decode_attention.py, Llama-3.1-8B's 8 key heads, bf16, µs a layer at 8K / 32K / 128K
# slots): 128 keys, 4 warps, 2 stages 26.1 / 56.9 / 144.8, the fastest or within 2% of it at each
# length over blocks of 32-128, 2-8 warps and 1-3 stages (64 keys: 28.8 / 60.7 / 171.1).
BLOCK_KEYS = 128
MIN_KEYS_PER_PART = 256


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def parts_for(programs_per_part: int, keys: int, sm_count: int) -> int:
    """Parts the keys are split into: about two programs per SM over the (batch, key head) rows,
    each part at least ``MIN_KEYS_PER_PART`` keys, and at least one part."""
    wanted = max(1, -(-2 * sm_count // programs_per_part))
    return max(1, min(wanted, keys // MIN_KEYS_PER_PART))


if triton is not None:
    @triton.jit
    def _part_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr,
                     q_b, q_h, q_g, k_b, k_h, k_s, v_b, v_h, v_s, mask_b, mask_s,
                     kv_heads, keys, keys_per_part, parts, scale,
                     GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                     PRECISION: tl.constexpr):
        # int64 offsets: one buffer of a large batch at a long context passes 2**31 elements
        row = tl.program_id(0).to(tl.int64)  # batch * kv_heads + head
        part = tl.program_id(1).to(tl.int64)
        b = row // kv_heads
        h = row % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * q_b + h * q_h + g[:, None] * q_g + d[None, :],
                    mask=(g[:, None] < GROUPS) & (d[None, :] < DIM), other=0.0)
        running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = part * keys_per_part
        end = tl.minimum(start + keys_per_part, keys)
        for offset in range(0, keys_per_part, BLOCK_N):
            n = start + offset + tl.arange(0, BLOCK_N)
            inside = n < end
            k = tl.load(k_ptr + b * k_b + h * k_h + n[:, None] * k_s + d[None, :],
                        mask=inside[:, None] & (d[None, :] < DIM), other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_N), float32
            keep = inside
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + b * mask_b + n * mask_s, mask=inside, other=0) != 0)
            scores = tl.where(keep[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a part with no key yet
            probs = tl.exp(scores - shift[:, None])
            rescale = tl.exp(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            v = tl.load(v_ptr + b * v_b + h * v_h + n[:, None] * v_s + d[None, :],
                        mask=inside[:, None] & (d[None, :] < DIM), other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
        at = (row * parts + part) * BLOCK_G + g
        tl.store(acc_ptr + at[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(max_ptr + at, running_max)
        tl.store(sum_ptr + at, running_sum)

    @triton.jit
    def _join_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, parts,
                     GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        overall = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for part in range(0, parts):
            overall = tl.maximum(overall, tl.load(max_ptr + (row * parts + part) * BLOCK_G + g))
        total = tl.zeros([BLOCK_G], tl.float32)
        out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for part in range(0, parts):
            at = (row * parts + part) * BLOCK_G + g
            weight = tl.exp(tl.load(max_ptr + at) - overall)
            total += weight * tl.load(sum_ptr + at)
            out += weight[:, None] * tl.load(acc_ptr + at[:, None] * BLOCK_D + d[None, :])
        out = out / total[:, None]
        tl.store(out_ptr + (row * GROUPS + g[:, None]) * DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g[:, None] < GROUPS) & (d[None, :] < DIM))


def flash_decode(grouped: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, parts: int | None = None, block_keys: int = BLOCK_KEYS,
                 num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for grouped queries (batch, kv_heads, groups, dim) against
    keys and values (batch, kv_heads, keys, dim) with unit stride over dim; ``mask`` is None or a
    boolean (batch or 1, 1, 1, keys), True where a key counts. Returns (batch, kv_heads, groups, dim)
    in the values' dtype. ``parts`` defaults to :func:`parts_for` (from shapes only: no host sync)."""
    if triton is None:
        raise RuntimeError("flash_decode needs Triton: pip install triton")
    grouped, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (grouped, key, value))
    batch, kv_heads, groups, dim = grouped.shape
    keys = key.shape[2]
    if parts is None:
        parts = parts_for(batch * kv_heads, keys, sm_count(key.device) if key.is_cuda else 1)
    keys_per_part = -(-keys // parts)
    keys_per_part = -(-keys_per_part // block_keys) * block_keys
    parts = -(-keys // keys_per_part)
    block_g = max(16, triton.next_power_of_2(groups))
    block_d = max(16, triton.next_power_of_2(dim))
    rows = batch * kv_heads
    acc = torch.empty(rows, parts, block_g, block_d, device=key.device, dtype=torch.float32)
    maxima = torch.empty(rows, parts, block_g, device=key.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    if mask is not None:
        flat = mask.expand(batch, 1, 1, keys)[:, 0, 0, :].view(torch.uint8)
        mask_args = (flat, flat.stride(0), flat.stride(1))
    else:
        mask_args = (key, 0, 0)  # never read
    _part_kernel[(rows, parts)](
        grouped, key, value, mask_args[0], acc, maxima, sums,
        grouped.stride(0), grouped.stride(1), grouped.stride(2),
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        mask_args[1], mask_args[2], kv_heads, keys, keys_per_part, parts, scale,
        GROUPS=groups, BLOCK_G=block_g, DIM=dim, BLOCK_D=block_d, BLOCK_N=block_keys,
        HAS_MASK=mask is not None, PRECISION="ieee" if value.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(batch, kv_heads, groups, dim, device=key.device, dtype=value.dtype)
    _join_kernel[(rows,)](acc, maxima, sums, out, parts, GROUPS=groups, BLOCK_G=block_g, DIM=dim,
                          BLOCK_D=block_d, num_warps=4)
    return out
