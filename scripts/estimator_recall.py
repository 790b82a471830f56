"""How much of the true attention each sparse estimate keeps (issue 29: "measure, do not guess").

A real model prefills real task prompts; the queries and keys (after rotary) of every layer before
``--layers`` are recorded, and per head every query block's true attention (softmax over the
causal prompt) is summed per key block. Each estimator then keeps, for every query block, the sink
block, the local band (LOCAL_BLOCKS before it and itself) and more blocks ranked by its estimate:

- ``shipped`` (core/sparse.py): the last query block's attention summed per key block, one
  ranking per head (cost: 128 queries against the prompt); each query block keeps
  ``ceil(D x its other causal blocks)`` of the blocks it can see, highest first;
- ``last-block``: the same ranking, every query block keeping ``ceil(D x blocks)`` (the budget
  of the rows below, about twice the shipped one's pairs);
- ``antidiagonal`` (XAttention-like, stride 16): per (query block, key block) the softmax of the
  antidiagonal-strided scores, summed per block (cost: 1/16 of the dense scores);
- ``vertical-slash`` (MInference-like): half the extra blocks by ``last-block``'s columns, half by
  the diagonals (query block - key block offsets) the last query block attends most;
- ``oracle``: the blocks of largest true attention for each query block (an upper bound).

Reported: the attention mass kept, mean over the query blocks beyond the local band (the last,
dense anyway, excluded) and heads, per layer and overall, and the worst head. CPU; bfloat16 model, float32 analysis.

  python scripts/estimator_recall.py --model qwen2.5-coder-1.5b --length 8k --layers 17 \
      --tasks niah_multikey_2,vt,qa_1 --densities 0.05,0.1 --out results/estimators/qwen-8k.json

After a gate (``DashConfig.later_density``): ``--setting LABEL --first-layer N`` prefills under a dense
halting setting and analyses layers N.. over the tokens they still compute (the compacted rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dash_prefill.bench.cli import parse_lengths
from dash_prefill.core.sparse import BLOCK, LOCAL_BLOCKS, SINK_BLOCKS, block_estimate, select_blocks
from dash_prefill.eval.runner import encode_sample, token_counter
from dash_prefill.eval.tasks import generate_samples
from dash_prefill.loading import load_model

STRIDE = 16
PAIRS: dict[float, dict[str, float]] = {}  # kept block pairs of each selection (last layer analysed)
RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    layer = getattr(module, "layer_idx", None)
    if layer is not None and FIRST <= layer < LAYERS and query.shape[2] == key.shape[2]:
        RECORDED[layer] = (query[0].float(), key[0].float())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def true_block_mass(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(blocks, blocks): mean over a query block's rows of its attention summed per key block."""
    q, k, pad = padded(q), padded(k), -q.shape[0] % BLOCK
    n = q.shape[0]
    scores = (q @ k.T) * scaling
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    hidden[:, :pad] = True
    probs = scores.masked_fill_(hidden, float("-inf")).softmax(-1).nan_to_num_(0.0)
    blocks = n // BLOCK
    return probs.view(blocks, BLOCK, blocks, BLOCK).sum(3).mean(1)


def antidiagonal_estimate(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(blocks, blocks): softmax of antidiagonal-strided scores, summed per block pair."""
    q, k, pad = padded(q), padded(k), -q.shape[0] % BLOCK
    n = q.shape[0]
    rows = n // STRIDE
    # entry (i, j) = sum_s q[i*S + S-1-s] . k[j*S + s]: the antidiagonal of each S x S tile
    qs = q.view(rows, STRIDE, -1).flip(1).reshape(rows, -1)
    ks = k.view(rows, STRIDE, -1).reshape(rows, -1)
    scores = (qs @ ks.T) * scaling / STRIDE  # XAttention's scale: a tile's antidiagonal sums STRIDE products
    hidden = torch.ones(rows, rows, dtype=torch.bool).triu(1)
    hidden[:, :pad // STRIDE] = True  # strided columns of padding only
    scores.masked_fill_(hidden, float("-inf"))
    per = BLOCK // STRIDE
    blocks = n // BLOCK
    return scores.softmax(-1).nan_to_num_(0.0).view(blocks, per, blocks, per).sum(3).mean(1)


def padded(x: torch.Tensor) -> torch.Tensor:
    """Zeros before the sequence so that blocks end where it ends (the grid of core/sparse.py)."""
    return torch.nn.functional.pad(x, (0, 0, -x.shape[0] % BLOCK, 0))


def pairs(keep: torch.Tensor) -> float:
    """Kept block pairs over causal block pairs."""
    blocks = keep.shape[0]
    return keep.tril().sum().item() / (blocks * (blocks + 1) / 2)


def keep_from_ranking(rank_scores: torch.Tensor, extra: int, taken: torch.Tensor | None = None) -> torch.Tensor:
    """(blocks, blocks) bool: sink + local band + the ``extra`` best-ranked causal blocks per row
    that are not already kept (nor in ``taken``)."""
    blocks = rank_scores.shape[0]
    index = torch.arange(blocks)
    query, key = index[:, None], index[None, :]
    causal = key <= query
    always = causal & ((query - key <= LOCAL_BLOCKS) | (key < SINK_BLOCKS))
    if taken is not None:
        always = always | taken
    ranked = rank_scores.masked_fill(~causal | always, float("-inf"))
    top = ranked.topk(min(extra, blocks), dim=-1).indices
    chosen = torch.zeros(blocks, blocks, dtype=torch.bool).scatter_(1, top, True) & causal & ~always
    return always | chosen


def slash_ranking(mass_last: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, blocks) ranking by the offset query block - key block the last block attends."""
    offsets = torch.arange(blocks - 1, -1, -1)  # key block j is at offset blocks-1-j from the last
    by_offset = torch.zeros(blocks).scatter_add_(0, offsets, mass_last)
    index = torch.arange(blocks)
    distance = (index[:, None] - index[None, :]).clamp(min=0)
    return by_offset[distance]


def recall(keep: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Kept attention mass per query block beyond the local band (the blocks before hold only
    kept blocks), the last (the question, dense) excluded."""
    return (mass * keep).sum(-1)[LOCAL_BLOCKS + 1:-1]


def analyse(q_all, k_all, scaling: float, densities) -> dict:
    heads, kv_heads = q_all.shape[0], k_all.shape[0]
    out = {}
    for h in range(heads):
        q, k = q_all[h], k_all[h // (heads // kv_heads)]
        mass = true_block_mass(q, k, scaling)
        blocks = mass.shape[0]
        vertical = block_estimate(q[None, None, -BLOCK:], k[None, None], scaling, None)[0, 0]
        anti = antidiagonal_estimate(q, k, scaling)
        rankings = {"last-block": vertical.expand(blocks, blocks), "antidiagonal": anti, "oracle": mass}
        for d in densities:
            extra = math.ceil(d * blocks)
            for name, ranking in rankings.items():
                out.setdefault((name, d), []).append(recall(keep_from_ranking(ranking, extra), mass))
            shipped = select_blocks(vertical[None, None], torch.tensor([0]), d)[0, 0]
            out.setdefault(("shipped", d), []).append(recall(shipped, mass))
            if h == 0:
                PAIRS.setdefault(d, {}).update({"shipped": pairs(shipped),
                                                "equal budget": pairs(keep_from_ranking(mass, extra))})
            half = keep_from_ranking(vertical.expand(blocks, blocks), math.ceil(extra / 2))
            slash = keep_from_ranking(slash_ranking(vertical, blocks), extra // 2, taken=half)
            out.setdefault(("vertical-slash", d), []).append(recall(half | slash, mass))
            out.setdefault(("local+sink", d), []).append(recall(keep_from_ranking(mass, 0), mass))
    return {key: torch.stack(v) for key, v in out.items()}  # (heads, query blocks)


def main(argv=None) -> int:
    global LAYERS, FIRST
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--length", default="8k")
    parser.add_argument("--layers", type=int, default=17, help="layers FIRST..N-1 (before the gate)")
    parser.add_argument("--first-layer", type=int, default=0, help="the first layer analysed")
    parser.add_argument("--setting", help="a dense halting label: layers after its gates see only the tokens kept")
    parser.add_argument("--tasks", default="niah_multikey_2,vt,qa_1")
    parser.add_argument("--densities", default="0.05,0.1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    LAYERS, FIRST = args.layers, args.first_layer
    densities = [float(d) for d in args.densities.split(",")]
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model, dtype="bfloat16", device="cpu")
    # Every sdpa attention call of this process records its queries and keys (the DASH prefill accepts
    # only the known implementations, so the recorder takes sdpa's name).
    AttentionInterface.register("sdpa", recording_attention)
    model.config._attn_implementation = "sdpa"
    length = parse_lengths(args.length)[0]
    rows = []
    for task in args.tasks.split(","):
        sample = generate_samples(task, token_counter(tokenizer), length, 1)[0]
        ids = torch.tensor([encode_sample(tokenizer, sample).ids])
        RECORDED.clear()
        if args.setting:
            from dash_prefill import DashConfig, prefill
            prefill(model, ids, DashConfig.from_label(args.setting))
        else:
            model.model(input_ids=ids)
        for layer in sorted(RECORDED):
            q, k = RECORDED[layer]
            scaling = model.model.layers[layer].self_attn.scaling
            for (name, d), kept in analyse(q, k, scaling, densities).items():
                rows.append({"task": task, "layer": layer, "estimator": name, "density": d,
                             "mean": kept.mean().item(), "worst_head": kept.mean(1).min().item(),
                             "tokens": ids.shape[1]})
            print(f"{task} layer {layer} done", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| estimator | density | kept attention (mean) | worst head (mean over layers) |")
    print("|---|---:|---:|---:|")
    print("kept block pairs (share of causal pairs):", json.dumps(PAIRS))
    for name in ("local+sink", "shipped", "last-block", "vertical-slash", "antidiagonal", "oracle"):
        for d in densities:
            sel = [r for r in rows if r["estimator"] == name and r["density"] == d]
            if name == "local+sink" and d != densities[0]:
                continue
            print(f"| {name} | {'—' if name == 'local+sink' else d} | {sum(r['mean'] for r in sel) / len(sel):.3f} "
                  f"| {sum(r['worst_head'] for r in sel) / len(sel):.3f} |")
    return 0


LAYERS, FIRST = 17, 0

if __name__ == "__main__":
    sys.exit(main())
