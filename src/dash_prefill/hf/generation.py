"""generate(): DASH prefill, then ordinary decoding from the DASH cache, timed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dash_prefill.hf.adapters import context_limit, input_device, output_cache
from dash_prefill.core.config import DashConfig
from dash_prefill.hf.decode import decode_step
from dash_prefill.hf.prefill import PrefillStats, prefill
from dash_prefill.core.profiles import config_or_recommended
from dash_prefill.hf.static_decode import check_static_mode, static_step

# Tokens between host reads of the stop check when decoding statically (more decoded tokens
# past the last stop, fewer syncs); the output is the same, cut after each row's stop token.
STOP_CHECK_EVERY = 32


@dataclass(frozen=True)
class GenerationResult:
    """Texts and token ids per prompt, the prefill stats and the measured times.

    time_to_first_token : seconds from the start of the prefill to the first generated token.
    decode_seconds : seconds spent generating the remaining tokens.
    config : the DashConfig the prefill ran with (the recommended one when none was given).
    """

    texts: list[str]
    token_ids: list[list[int]]
    stats: PrefillStats
    time_to_first_token: float
    decode_seconds: float
    config: DashConfig | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The model's own forward on the prompt, computing only the last position's logits (the
    fair baseline): (logits (batch, vocab), its cache)."""
    output = model(input_ids, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1], output_cache(output)


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as a user turn of the tokenizer's chat template (as is without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return text + "\nAnswer:"


def check_fits(model, config: DashConfig | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """ValueError, before any model work, unless the prompt and the new tokens fit the model's
    context and every gate (the start layer, any later gates) lies inside the model, in order."""
    from dash_prefill.loading import max_context

    limit = max_context(model)
    if prompt_tokens + max_new_tokens > limit:
        if not max_new_tokens:  # inspect: a prefill only
            raise ValueError(f"the prompt has {prompt_tokens} tokens but the model's context is {limit}; "
                             f"shorten the prompt")
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
            f"but the model's context is {limit}; shorten the prompt or lower max_new_tokens")
    if config is not None and config.scores_tokens:
        config.resolve_gates(model.config.get_text_config().num_hidden_layers)


def encode_prompts(tokenizer, prompts, pad_token_id: int, chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention_mask) from a string, strings, token ids or lists of them.

    Strings are tokenized as given, or as a chat user turn with ``chat`` (:func:`chat_prompt`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of strings, or token ids; got nothing")
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else p for p in prompts]  # rows as tensors
    if all(isinstance(p, int) for p in prompts):
        prompts = [list(prompts)]
    if all(isinstance(p, str) for p in prompts):
        if any(not p.strip() for p in prompts):
            raise ValueError("a prompt is empty: pass some text")
        rows = [tokenizer(chat_prompt(tokenizer, p) if chat else p)["input_ids"] for p in prompts]
    elif chat:
        raise ValueError("chat=True applies to text prompts; token ids are used as given")
    elif all(isinstance(p, (list, tuple)) for p in prompts):
        rows = [list(p) for p in prompts]
    else:
        raise ValueError("prompts must be all strings or all token-id lists, not a mix")
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty: pass at least one token")
    wrong = next((t for r in rows for t in r if not isinstance(t, int) or isinstance(t, bool)), None)
    if wrong is not None:
        raise ValueError(f"token ids must be integers; got {type(wrong).__name__} {wrong!r}")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def stop_token_ids(model, tokenizer, eos_token_id: int | list[int] | None = None) -> set[int]:
    """EOS ids: ``eos_token_id`` if given, else the generation config's, else the tokenizer's."""
    value = eos_token_id
    if value is None:
        value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def continue_decoding(model, state, token: torch.Tensor, max_new_tokens: int, stop: set[int],
                      choose=None, pad_id: int = 0, static: bool | str = False, streamer=None) -> list[list[int]]:
    """Decode from a prefill whose first generated token per row is ``token`` (batch,).

    ``choose(logits, tokens_so_far)`` picks the next tokens (greedy by default). Rows stop at
    a token in ``stop`` (kept) or after ``max_new_tokens``; finished rows are padded with
    ``pad_id`` while others go on. Returns each row's tokens, cut after its stop token.
    ``static``: decode into preallocated buffers (:mod:`static_decode`, a CUDA graph on a GPU),
    reading the stop check on the host every ``STOP_CHECK_EVERY`` tokens instead of every token.
    ``streamer.put`` gets each later token (batch,), on the model's device.
    """
    choose = choose or (lambda logits, tokens: logits.argmax(-1))
    if static:
        step, check_every = static_step(model, state, max_new_tokens - 1, static), STOP_CHECK_EVERY
    else:
        step, check_every = (lambda ids: decode_step(model, state, ids)), 1
    tokens = [token]
    finished = torch.zeros_like(token, dtype=torch.bool)
    stop_tensor = torch.tensor(sorted(stop), device=token.device, dtype=token.dtype)
    for index in range(max_new_tokens - 1):
        finished |= (token[:, None] == stop_tensor).any(-1)  # not torch.isin: on CUDA it may sort (a host sync)
        if (index + 1) % check_every == 0 and bool(finished.all()):  # the one host sync
            break
        logits = step(token[:, None]).to(token.device)
        token = choose(logits, torch.stack(tokens, 1))
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        if streamer is not None:
            streamer.put(token)
    rows = torch.stack(tokens, 1).tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


def generate(model, tokenizer, prompts, config: DashConfig | None = None, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             vision_config: DashConfig | None = None, chat: bool = False,
             static_decode: bool | str = False, streamer=None, **multimodal) -> GenerationResult:
    """Answer ``prompts`` with DASH prefill and ordinary decoding.

    Parameters
    ----------
    prompts : str, list[str], list[int], list[list[int]] or (batch, seq) tensor
        Batches are left-padded here; token ids are used as given (no special tokens added).
        Strings are tokenized as given unless ``chat`` is set.
    config : DashConfig, default: the model's recommended setting (:func:`dash_prefill.recommended_config`,
        logged at INFO; ``result.config`` holds the one used).
    chat : wrap string prompts in the tokenizer's chat template as a user turn, as
        ``dash-prefill run`` does (:func:`chat_prompt`); instruction-tuned models answer
        far better that way.
    max_new_tokens : tokens generated per prompt at most (stops early at the EOS token).
    do_sample, temperature, top_k, top_p, seed : sampling as in HF ``generate``; greedy by default.
    attention_mask : (batch, seq), with ``prompts`` given as an already left-padded id tensor
        (a processor's output); otherwise the padding is made here.
    static_decode : decode into per-layer caches preallocated for the new tokens, the decode step
        replayed as one CUDA graph per token on a GPU (eagerly elsewhere; the same tokens as the
        default path). Needs the model on one device and sdpa or eager attention.
        ``"compiled"``: the step is compiled by ``torch.compile`` (its small kernels fused) and
        replayed as CUDA graphs; the first generate of a model compiles (a minute or two for
        an 8B model). Measured faster than ``True`` at 8K, slower at 32K (BENCHMARKS.md).
    streamer : as in HF ``generate`` (e.g. ``transformers.TextStreamer``): ``put`` gets the prompt
        ids (batch, seq), then each generated token (batch,) on the model's device, then ``end()``.
        A streamer that reads the tokens makes the host wait for every token.
    vision_config, **multimodal :
        Vision-language models: halting in the vision encoder, and the processor's other outputs
        (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ...); see :func:`prefill`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    check_static_mode(static_decode)
    if config is not None and not isinstance(config, DashConfig):
        raise ValueError(f"config must be a DashConfig (dp.DashConfig(halt_ratio=0.5)); got {type(config).__name__}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if attention_mask is not None and not isinstance(prompts, torch.Tensor):
        raise ValueError("attention_mask goes with prompts given as a left-padded id tensor (a "
                         "processor's output); for strings or lists, leave it out: padding is made here")
    if attention_mask is not None:
        ids, mask = prompts if prompts.dim() == 2 else prompts[None], attention_mask
        mask = mask if mask.dim() == 2 else mask[None]
    else:
        ids, mask = encode_prompts(tokenizer, prompts, pad_id, chat)
    config = config_or_recommended(model, config, int(mask.sum(-1).max()))  # the longest row decides a batch
    check_fits(model, config, ids.shape[1], max_new_tokens)
    warpers = LogitsProcessorList()
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
        warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    generator = None
    stop = stop_token_ids(model, tokenizer, eos_token_id)
    device = input_device(model)
    if do_sample:
        generator = torch.Generator(device=device)  # private: torch's global RNG is left alone
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

    def choose(logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = warpers(generated, logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    ids, mask = ids.to(device), mask.to(device)
    if streamer is not None:
        streamer.put(ids.cpu())
    _synchronize(device)
    started = time.perf_counter()
    state = prefill(model, ids, config, attention_mask=mask, vision_config=vision_config, **multimodal)
    token = choose(state.logits.to(device), ids)
    _synchronize(device)
    first_token_at = time.perf_counter()
    if streamer is not None:
        streamer.put(token)
    trimmed = continue_decoding(model, state, token, max_new_tokens, stop,
                                lambda logits, tokens: choose(logits, torch.cat([ids, tokens], 1)), pad_id,
                                static_decode, streamer)
    if streamer is not None:
        streamer.end()
    _synchronize(device)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in trimmed]
    return GenerationResult(texts=texts, token_ids=trimmed, stats=state.stats,
                            time_to_first_token=first_token_at - started,
                            decode_seconds=time.perf_counter() - first_token_at, config=config)
