"""vLLM's Llama and Qwen2 models with DASH gates: vLLM's own layers, one loop that halts tokens.

Layers up to a gate run as vLLM runs them. At a gate the layer's attention runs on every token
entering it; each request prefilling its prompt then scores its tokens with the same policies
and ``Eligibility`` as the Hugging Face path (``dash_prefill.core.policy``), keeps
``plan.kept_tokens`` of them, and the batch is compacted before the feed-forward sublayer.
Layers after the gate attend with the metadata their own builder made for the compacted batch
(``plan.py``), at the survivors' original positions. Requests that decode pass through untouched.
The last hidden states go back to the original token layout, where vLLM reads each request's
last token (always kept) for its logits.
"""

from __future__ import annotations

import functools

import torch

from dash_prefill.vllm import check_setting, check_version

check_version()  # this module uses vLLM internals of the supported releases only

from vllm.distributed import get_tp_group  # noqa: E402
from vllm.forward_context import get_forward_context  # noqa: E402
from vllm.model_executor.models.llama import LlamaForCausalLM  # noqa: E402
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, subclass_attention_backend  # noqa: E402

from dash_prefill.core.config import DashConfig  # noqa: E402
from dash_prefill.core.profiles import check_bound  # noqa: E402
from dash_prefill.core.policy import Eligibility, ScoreContext, Selection, policy_scores, select_among_survivors  # noqa: E402
from dash_prefill.vllm.plan import HaltedOffsets, layer_metadata, logical_slots, prompt_rows, step_plans  # noqa: E402


def setting_of(hf_config) -> tuple[DashConfig, list[tuple[int, float]], int | None]:
    """The DashConfig given to vLLM as ``hf_overrides={"dash": {"label": ...}}`` (or its fields), its
    gates on this model and the longest prompt it halts (a recommended setting's
    ``max_prompt_tokens``; None: every prompt); ValueError saying what to change for one DASH
    cannot run."""
    fields = getattr(hf_config, "dash", None)
    if not isinstance(fields, dict):
        raise ValueError('DASH in vLLM needs its setting: hf_overrides={"dash": {"label": "dash@0.5/d0.4"}}, '
                         'DashConfig fields, or {} for the recommended one (dash_prefill.vllm.engine_args builds it)')
    fields = dict(fields)
    bound = fields.pop("max_prompt_tokens", None)
    check_bound(bound)
    if not fields:  # "dash": {} asks for the model's recommended setting
        from dash_prefill.vllm import recommended_for

        found = recommended_for(hf_config._name_or_path)
        config, bound = found.config, found.max_prompt_tokens if bound is None else bound
    else:
        config = DashConfig.from_label(fields["label"]) if set(fields) == {"label"} else DashConfig(**fields)
    check_setting(config)
    num_layers = hf_config.get_text_config().num_hidden_layers
    gates = config.resolve_gates(num_layers) if config.scores_tokens else []
    if gates and gates[-1][0] >= num_layers - 1:
        raise ValueError(f"a gate at the last layer ({gates[-1][0]}) halts nothing: put every gate before "
                         f"layer {num_layers - 1}")
    return config, gates, bound


@functools.lru_cache(maxsize=None)
def gate_backend(base, config: DashConfig, ratios: tuple[float, ...], gate: int, at_gate: bool,
                 max_prompt_tokens: int | None = None):
    """``base`` (vLLM's attention backend) whose metadata builder serves the gate layer number
    ``gate`` (``at_gate``: its prefilling requests still attend over every token entering it)
    or the layers after it (the compacted batch): query starts, sequence lengths, KV slots."""
    base_builder = base.get_builder_cls()

    class Builder(base_builder):
        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            return AttentionCGSupport.NEVER  # the token count after a gate is chosen per step

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            common = common_attn_metadata
            seq_lens_cpu = getattr(common, "seq_lens_cpu_upper_bound", None)
            if seq_lens_cpu is None:
                seq_lens_cpu = common.seq_lens.cpu()
            query_lens, prompt = prompt_rows(common.query_start_loc_cpu, seq_lens_cpu[:common.num_reqs])
            plan = step_plans(query_lens, prompt, config, list(ratios), max_prompt_tokens)[gate]
            if not hasattr(self, "halted_offsets"):
                self.halted_offsets = HaltedOffsets()
            blocks = common.block_table_tensor[:common.num_reqs]
            offsets = self.halted_offsets.update(blocks[:, 0], plan, self._num_blocks(), at_gate)
            counts = plan.entering if at_gate else plan.leaving
            layer, slots = layer_metadata(common, counts, prompt, offsets, self.kv_cache_spec.block_size)
            metadata = super().build(0, layer, fast_build)
            metadata.dash_plan, metadata.dash_slots = plan, slots
            metadata.dash_blocks = (blocks, self.kv_cache_spec.block_size)
            return metadata

        def _num_blocks(self) -> int:
            layer = self.vllm_config.compilation_config.static_forward_context[self.layer_names[0]]
            return layer.kv_cache.shape[0]

    name = f"DashGate{gate}{'At' if at_gate else 'After'}"
    return subclass_attention_backend(name, base, Builder)


def gate_attention(attention, positions: torch.Tensor, x: torch.Tensor):
    """A Llama/Qwen2 attention sublayer that also returns what the policies read.
    -> (U, q, k, v): U (tokens, hidden) the update; q, k rotated (tokens, heads * head_dim) of
    this rank's heads; v (tokens, kv_heads * head_dim)."""
    qkv, _ = attention.qkv_proj(x)
    q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
    if getattr(attention, "qk_norm", False):
        tokens = q.shape[0]
        q = attention.q_norm(q.view(tokens, attention.num_heads, attention.head_dim)).view(tokens, -1)
        k = attention.k_norm(k.view(tokens, attention.num_kv_heads, attention.head_dim)).view(tokens, -1)
    q, k = attention.rotary_emb(positions, q, k)
    update, _ = attention.o_proj(attention.attn(q, k, v))
    return update, q, k, v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(tokens, heads * head_dim) -> (1, heads, tokens, head_dim)."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)[None]


class Halting:
    """The DASH loop over a vLLM Llama/Qwen2 model's layers (``model``: its ``LlamaModel``)."""

    def __init__(self, model, vllm_config):
        self.model = model
        self.tp_size = get_tp_group().world_size
        config, gates, max_prompt_tokens = setting_of(vllm_config.model_config.hf_config)
        self.config = config
        num_layers = len(model.layers)
        self.record: list | None = None  # set to [] to record each prefilled prompt's survivors per gate
        self.gate_of = {layer: j for j, (layer, _) in enumerate(gates)}
        ratios = tuple(ratio for _, ratio in gates)
        # Attention layer names from each gate up to the next: the gate layer's own metadata first
        # (its query is every token entering it), then the compacted batch's for the layers after.
        self.groups: list[list[str]] = []
        for j, (layer, _) in enumerate(gates):
            end = gates[j + 1][0] if j + 1 < len(gates) else num_layers
            names = []
            for index in range(layer, end):
                attention = model.layers[index].self_attn.attn
                attention.attn_backend = gate_backend(attention.attn_backend, config, ratios, j, index == layer,
                                                      max_prompt_tokens)
                names.append(attention.layer_name)
            self.groups.append(names)

    def plans(self):
        """This step's gate plans, after pointing the later layers' KV writes at their compacted
        slots; None when the step has no attention metadata (vLLM's memory profiling)."""
        context = get_forward_context()
        metadata = context.attn_metadata
        if not self.groups or not isinstance(metadata, dict) or self.groups[0][0] not in metadata \
                or context.slot_mapping is None:
            return None
        plans = []
        for names in self.groups:
            plans.append((metadata[names[0]].dash_plan, metadata[names[0]].dash_blocks))
            for name in names:
                context.slot_mapping[name] = metadata[name].dash_slots
        return plans

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        model = self.model
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        num_tokens = hidden.shape[0]
        plans = self.plans()
        residual, origin, survivors = None, None, {}
        for index, layer in enumerate(model.layers):
            gate = self.gate_of.get(index)
            if gate is None or plans is None:
                hidden, residual = layer(positions, hidden, residual)
                continue
            if residual is None:
                residual, x = hidden, layer.input_layernorm(hidden)
            else:
                x, residual = layer.input_layernorm(hidden, residual)
            update, q, k, v = gate_attention(layer.self_attn, positions, x)
            plan, blocks = plans[gate]
            if plan.halts or update.shape[0] != sum(plan.entering):
                keep = self.keep(plan, blocks, gate, layer.self_attn, update, residual, q, k, v, positions, survivors)
                update, residual, positions = update[keep], residual[keep], positions[keep]
                origin = keep if origin is None else origin[keep]
            x, residual = layer.post_attention_layernorm(update, residual)
            hidden = layer.mlp(x)
        hidden, _ = model.norm(hidden, residual)
        if self.record is not None and survivors:
            self.record.extend({"prompt_tokens": plans[0][0].prompt[r], "kept": [a.tolist() for a in alive]}
                               for r, alive in sorted(survivors.items()))
        if origin is None:
            return hidden
        return hidden.new_zeros(num_tokens, hidden.shape[-1]).index_copy_(0, origin, hidden)

    def keep(self, plan, blocks, gate: int, attention, update, hidden, q, k, v, positions, survivors) -> torch.Tensor:
        """Rows of the current batch computed after the gate: every token of a decoding request,
        the chosen tokens of a prefilling one (same count on every tensor-parallel rank). The
        gate layer's cache keeps only the chosen tokens too, moved to its first logical slots."""
        pieces, moved, slots, start = [], [], [], 0
        ratio = self.config.later_gates[gate - 1][1] if gate else self.config.halt_ratio
        block_table, block_size = blocks
        for r, (entering, leaving, prompt) in enumerate(zip(plan.entering, plan.leaving, plan.prompt)):
            rows = torch.arange(start, start + entering, device=update.device)
            if leaving < entering:
                part = slice(start, start + entering)
                context = ScoreContext(
                    output=update[part][None], hidden=hidden[part][None], config=self.config, padding=None,
                    window_queries=lambda part=part, n=entering: _heads(
                        q[part][n - min(max(self.config.protect_last, 1), n):], attention.num_heads),
                    keys=_heads(k[part], attention.num_kv_heads), values=_heads(v[part], attention.num_kv_heads),
                    positions=positions[part][None], scaling=attention.scaling,
                    all_reduce=get_tp_group().all_reduce if self.tp_size > 1 else None, ranks=self.tp_size)
                alive = survivors.setdefault(r, [])  # the request's prompt indices kept at each gate so far
                chosen = self.choose(context, prompt, ratio, alive[-1] if alive else None)
                if self.tp_size > 1:  # every rank computes the same tokens: rank 0's choice is everyone's
                    chosen = get_tp_group().broadcast(chosen, src=0)
                alive.append(alive[-1][chosen] if alive else chosen)
                rows = rows[chosen]
                moved.append(rows)
                slots.append(logical_slots(block_table[r].expand(leaving, -1),
                                           torch.arange(leaving, device=rows.device), block_size))
            pieces.append(rows)
            start += entering
        if moved:  # the gate layer caches the chosen tokens at logical slots 0..k-1, as later layers do
            layer, moved = attention.attn, torch.cat(moved)
            layer.impl.do_kv_cache_update(layer, k[moved].view(-1, layer.num_kv_heads, layer.head_size),
                                          v[moved].view(-1, layer.num_kv_heads, layer.head_size),
                                          layer.kv_cache, torch.cat(slots))
        return torch.cat(pieces)

    def choose(self, context: ScoreContext, prompt: int, ratio: float, alive: torch.Tensor | None) -> torch.Tensor:
        """Indices (ascending) among the tokens entering the gate of the ones one request keeps:
        at the first gate its whole prompt is ranked, at a later gate its survivors (``alive``:
        their prompt indices) in the prompt's index space, by the HF path's own functions."""
        config = self.config
        eligibility = Eligibility.of_prompt([prompt], prompt, ratio, config.protect_first, config.protect_last,
                                            device=context.output.device)
        if alive is None:
            return eligibility.select(policy_scores(context)).index[0]
        survivors = Selection(alive[None], None, [alive.numel()])
        return select_among_survivors(context, eligibility, survivors, prompt)[1].index[0]


class _Gated:
    """A vLLM causal LM whose forward runs the DASH loop (``Halting``) over its own layers."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.halting = Halting(self.model, vllm_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.halting.forward(input_ids, positions, inputs_embeds)


class DashLlamaForCausalLM(_Gated, LlamaForCausalLM):
    """vLLM's Llama (SmolLM2, Llama 3.x) with DASH gates."""


class DashQwen2ForCausalLM(_Gated, Qwen2ForCausalLM):
    """vLLM's Qwen2 (Qwen2.5, Qwen2.5-Coder) with DASH gates."""
