"""``dash-prefill inspect``: what DASH sees in one prompt and what it halts.

Writes two files:

- ``delta_norms.png``: per layer, the quantiles (5/25/50/75/95 %) over the prompt tokens of the
  attention output ||U_t|| (absolute) and ||U_t|| / ||h_t|| (relative), side by side. U is the
  tensor the engine scores (``adapters.PreNormAdapter.attention_output``; for Gemma-3 the output
  before its post-attention norm), computed by running every layer on every token with the
  engine's own ``prefill.layer_step``, as with policy "none".
- ``tokens.html``: the prompt's tokens, the halted ones greyed out, for one ``DashConfig``
  (from ``prefill(...).active_mask``), with a legend and the prefill stats.

The prompt is tokenized as ``generate`` tokenizes it: as given, or (``chat=True``, the
command's default unless ``--raw``) as a user turn of the chat template, like ``dash-prefill run``.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dash_prefill.hf.adapters import adapter_for
from dash_prefill.core.config import DashConfig
from dash_prefill.hf.cache import KeyLayout
from dash_prefill.hf.generation import check_fits, encode_prompts
from dash_prefill.hf.prefill import LayerInputs, PrefillStats, layer_step, prefill
from dash_prefill.core.policy import delta_norm

logger = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Inspection:
    """Paths written by :func:`inspect_prompt`, the per-layer norms and the prefill stats.

    absolute, relative : (layers, seq) float32 — ||U_t|| and ||U_t|| / ||h_t|| per layer.
    halted : sorted token indices halted under the config.
    """

    plot_path: Path
    html_path: Path
    absolute: torch.Tensor
    relative: torch.Tensor
    halted: list[int]
    stats: PrefillStats


@torch.no_grad()
def delta_norms(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||U_t|| and ||U_t|| / ||h_t|| of every token at every layer, all tokens computed.

    input_ids : (seq,) -> two (layers, seq) float32 tensors.
    """
    adapter = adapter_for(model)
    hidden = adapter.embed(input_ids[None])  # (1, seq, hidden)
    seq_len = hidden.shape[1]
    positions = torch.arange(seq_len, device=hidden.device)[None]  # (1, seq)
    inputs = LayerInputs(adapter, hidden.dtype, positions, KeyLayout(positions, None, seq_len))
    absolute, relative = [], []
    for idx, layer in enumerate(adapter.layers):
        rotary, mask = inputs.get(idx, hidden.device)

        def record(after, output, entering=hidden):  # U, read between the two sublayers
            absolute.append(delta_norm(output)[0])
            relative.append(delta_norm(output, entering)[0])
            return after
        hidden = layer_step(adapter, layer, hidden, rotary, mask, None, record)
    return torch.stack(absolute).cpu(), torch.stack(relative).cpu()


def plot_norms(absolute: torch.Tensor, relative: torch.Tensor, start_layer: int, path: Path,
               title: str = "") -> None:
    """Per-layer quantile bands of both scores, side by side, the start layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, name in ((axes[0], absolute, "||U_t||"), (axes[1], relative, "||U_t|| / ||h_t||")):
        bands = torch.quantile(values.float().cpu(), torch.tensor(QUANTILES, device="cpu"), dim=1).numpy()  # (quantiles, layers)
        layers = range(values.shape[0])
        ax.fill_between(layers, bands[0], bands[4], alpha=0.2, color="C0", label="5-95 %")
        ax.fill_between(layers, bands[1], bands[3], alpha=0.4, color="C0", label="25-75 %")
        ax.plot(layers, bands[2], color="C0", label="median")
        ax.axvline(start_layer, color="C3", linestyle="--", label=f"start layer {start_layer}")
        ax.set(xlabel="layer", ylabel=name, yscale="log", title=f"{name} per layer")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto}
.text{font-family:monospace;white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;padding:1em}
.tok{border-radius:2px}.active{background:#fff3c4}.halted{color:#bbb}
table{border-collapse:collapse}td{padding:0 1em 0 0}"""


def token_html(pieces: list[str], halted: set[int], config: DashConfig, stats: PrefillStats) -> str:
    """The page: every token a span (class ``halted`` or ``active``, ``data-index``), legend, stats."""
    spans = []
    for index, piece in enumerate(pieces):
        kind = "halted" if index in halted else "active"
        text = html.escape(piece).replace("\n", "↵\n")
        spans.append(f'<span class="tok {kind}" data-index="{index}" title="{index}">{text}</span>')
    rows = {"policy": f"{config.policy} ({config.score})", "halt ratio": config.halt_ratio,
            "start layer": f"{stats.start_layer} of {stats.num_layers}",
            "prompt tokens": stats.prompt_tokens[0], "kept tokens": stats.kept_tokens[0],
            "halted tokens": stats.halted_tokens[0],
            "protected": f"first {config.protect_first}, last {config.protect_last}",
            "KV cache saved": f"{stats.kv_saved_fraction:.1%}",
            "ideal speedup": f"{stats.ideal_speedup:.2f}x"}
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>DASH halting</title>"
            f"<style>{_STYLE}</style></head><body><h1>DASH halting</h1>"
            f"<p>Legend: <span class='tok active'>active token</span> "
            f"<span class='tok halted'>halted token</span> (halted after layer {stats.start_layer}; "
            f"↵ marks a newline)</p><table>{table}</table>"
            f"<div class='text'>{''.join(spans)}</div></body></html>\n")


def inspect_prompt(model, tokenizer, text: str, config: DashConfig, out_dir, chat: bool = False) -> Inspection:
    """Plot the per-layer update norms of ``text`` and render its halted tokens.

    Parameters
    ----------
    model, tokenizer : a supported causal LM and its tokenizer.
    text : str
        The prompt, tokenized as is (``chat``: as a user turn of the chat template).
    config : DashConfig
        The halting to show (its policy, ratio, start layer and protection windows).
    out_dir : path
        Receives ``delta_norms.png`` and ``tokens.html``.
    """
    ids = encode_prompts(tokenizer, text, 0, chat)[0][0]  # (seq,)
    check_fits(model, config, len(ids), 0)
    protected = config.protect_first + config.protect_last
    if config.scores_tokens and config.halt_ratio > 0 and len(ids) <= protected:
        raise ValueError(f"the prompt has {len(ids)} tokens, all protected (the first {config.protect_first} "
                         f"and the last {config.protect_last} are always kept), so none can halt: give a "
                         f"prompt longer than {protected} tokens or a smaller --protect-last")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    absolute, relative = delta_norms(model, ids)
    result = prefill(model, ids[None], config)
    halted = (~result.active_mask[0]).nonzero()[:, 0].tolist()
    start = result.stats.start_layer if config.scores_tokens else config.resolve_start_layer(len(absolute))
    plot_path = out_dir / "delta_norms.png"
    title = f"{config.label}: {len(halted)} of {len(ids)} prompt tokens halted after layer {start}"
    if config.scores_tokens and config.policy != "dash":  # the norms shown are DASH's score, not this policy's
        title += f"\npolicy {config.policy} does not rank tokens by ||U||: these norms are not what it halted by"
    plot_norms(absolute, relative, start, plot_path, title)
    pieces = [tokenizer.decode([i]) for i in ids.tolist()]
    html_path = out_dir / "tokens.html"
    html_path.write_text(token_html(pieces, set(halted), config, result.stats), encoding="utf-8")
    logger.info("wrote %s and %s (%d of %d tokens halted)", plot_path, html_path, len(halted), len(ids))
    return Inspection(plot_path, html_path, absolute, relative, halted, result.stats)
