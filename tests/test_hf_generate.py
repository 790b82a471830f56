"""HF ``model.generate`` under ``dash_prefill.halting``: DASH prefill, HF's own generation loop."""

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from conftest import build_model, random_ids
from dash_prefill import DashConfig, decode_step, halting, prefill
from dash_prefill.hf.generation import generate
from dash_prefill.hf.halting import DashCache
from test_errors import _Tokenizer
from test_vlm import GRIDS, _padded_pair
from vlms import BUILDERS, build_vlm, vlm_inputs

NEW = 8
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # no EOS: every row runs NEW tokens

# The cache's name in a forward's arguments and outputs: ``cache`` since transformers' rename,
# ``past_key_values`` before it (5.17, the GPU machine's version).
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache(output):
    return getattr(output, CACHE)


def _config(ratio):
    return DashConfig(halt_ratio=ratio, start_layer=1, protect_first=2, protect_last=3)


@pytest.fixture(params=["single", "padded"])
def prompt(request):
    """(ids, attention_mask): one row of 30 tokens, or rows of 30 and 19 tokens, left-padded."""
    if request.param == "single":
        ids = random_ids(1, 30)
        return ids, torch.ones_like(ids)
    short = torch.cat([torch.zeros(11, dtype=torch.long), random_ids(1, 19, seed=4)[0]])
    ids = torch.stack([random_ids(1, 30, seed=3)[0], short])
    return ids, (torch.arange(30)[None] >= torch.tensor([0, 11])[:, None]).long()


def _new_tokens(output, width):
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return sequences[:, width:].tolist()


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_greedy_hf_generate_under_halting_equals_dash_generate(family, implementation, prompt, ratio, one_thread):
    model = build_model(family, implementation)
    ids, mask = prompt
    with halting(model, _config(ratio)):
        output = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, **GREEDY)
    expected = generate(model, _Tokenizer(), ids, _config(ratio), max_new_tokens=NEW, attention_mask=mask,
                        eos_token_id=[])
    assert _new_tokens(output, ids.shape[1]) == expected.token_ids
    assert output.past_key_values.state.stats.kept_tokens == expected.stats.kept_tokens


def test_zero_ratio_under_halting_equals_plain_hf_generate(family, prompt, one_thread):
    model = build_model(family)
    ids, mask = prompt
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    with halting(model, DashConfig(halt_ratio=0.0)):
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(ours, plain)


@pytest.fixture(params=list(BUILDERS))
def vlm(request):
    return request.param


def _vlm_prompt(model, padded):
    if padded:
        return _padded_pair(model)[0]
    inputs = vlm_inputs(model, images=2, grids=GRIDS)
    return dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_greedy_hf_generate_on_a_vlm_equals_dash_generate(vlm, padded, ratio, one_thread):
    model = build_vlm(vlm)
    inputs = _vlm_prompt(model, padded)
    with halting(model, _config(ratio)):
        ours = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    extra = dict(inputs)
    ids, mask = extra.pop("input_ids"), extra.pop("attention_mask")
    expected = generate(model, _Tokenizer(), ids, _config(ratio), max_new_tokens=6, attention_mask=mask,
                        eos_token_id=[], **extra)
    assert _new_tokens(ours, ids.shape[1]) == expected.token_ids


@pytest.mark.parametrize("padded", [False, True])
def test_zero_ratio_on_a_vlm_equals_plain_hf_generate(vlm, padded, one_thread):
    model = build_vlm(vlm)
    inputs = _vlm_prompt(model, padded)
    plain = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    with halting(model, DashConfig(halt_ratio=0.0)):
        ours = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    assert torch.equal(ours, plain)


def test_vision_config_halts_in_the_encoder_as_dash_generate_does(vlm, one_thread):
    model = build_vlm(vlm)
    inputs = _vlm_prompt(model, padded=False)
    vision = DashConfig(halt_ratio=0.5, start_layer=0)
    with halting(model, _config(0.5), vision_config=vision):
        ours = model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True, output_logits=True,
                              **GREEDY)
    extra = dict(inputs)
    ids, mask = extra.pop("input_ids"), extra.pop("attention_mask")
    expected = generate(model, _Tokenizer(), ids, _config(0.5), max_new_tokens=6, attention_mask=mask,
                        eos_token_id=[], vision_config=vision, **extra)
    assert _new_tokens(ours, ids.shape[1]) == expected.token_ids
    halted = prefill(model, ids, _config(0.5), mask, vision_config=vision, **extra).logits
    full = prefill(model, ids, _config(0.5), mask, **extra).logits
    torch.testing.assert_close(ours.logits[0], halted, rtol=0, atol=0)
    assert (halted - full).abs().max() > 1e-4  # the encoder did halt


def _identities(model):
    return {name: id(value) for name, value in vars(model).items()}


def test_leaving_the_block_restores_the_model_exactly(one_thread):
    model = build_model("llama")
    ids = random_ids(1, 20)
    plain = model.generate(ids, max_new_tokens=NEW, **GREEDY)
    before, weights = _identities(model), {k: v.clone() for k, v in model.state_dict().items()}
    with halting(model, _config(0.5)):
        assert model.forward.dash_halting and model.generate.dash_halting
        model.generate(ids, max_new_tokens=NEW, **GREEDY)
    assert _identities(model) == before
    assert model.forward.__func__ is type(model).forward and model.generate.__func__ is type(model).generate
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, **GREEDY), plain)


def test_an_exception_inside_the_block_still_restores_the_model(one_thread):
    model = build_model("qwen3")
    before = _identities(model)
    with pytest.raises(RuntimeError, match="inside"):
        with halting(model, _config(0.5)):
            raise RuntimeError("inside")
    with pytest.raises(ValueError, match="beam search"):
        with halting(model, _config(0.5)):
            model.generate(random_ids(1, 20), max_new_tokens=4, num_beams=2)
    assert _identities(model) == before


def test_sampling_at_zero_ratio_draws_what_plain_sampling_draws_with_the_same_seed(one_thread):
    model = build_model("qwen3")
    ids = random_ids(2, 20)
    options = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(7)
    plain = model.generate(ids, **options)
    with halting(model, DashConfig(halt_ratio=0.0)):
        torch.manual_seed(7)
        ours = model.generate(ids, **options)
        torch.manual_seed(8)
        other = model.generate(ids, **options)
    assert torch.equal(ours, plain) and not torch.equal(ours, other)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")


class _StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_receives_the_prompt_then_each_generated_token(one_thread):
    model = build_model("mistral")
    ids, streamer = random_ids(1, 20), _Collect()
    with halting(model, _config(0.5)):
        output = model.generate(ids, max_new_tokens=5, streamer=streamer, **GREEDY)
    assert streamer.chunks[0] == ids.tolist() and streamer.chunks[-1] == "end"
    assert [chunk[0] for chunk in streamer.chunks[1:-1]] == output[0, 20:].tolist()


def test_eos_and_stopping_criteria_stop_as_dash_generate_does(one_thread):
    model = build_model("gemma3")
    ids, config = random_ids(1, 20), _config(0.5)
    free = generate(model, _Tokenizer(), ids, config, max_new_tokens=NEW, eos_token_id=[]).token_ids[0]
    stop = free[2]
    with halting(model, config):
        at_eos = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=0)
        criteria = model.generate(ids, max_new_tokens=NEW, stopping_criteria=[_StopAfter(23)], **GREEDY)
    assert at_eos[0, 20:].tolist() == free[:free.index(stop) + 1]
    assert criteria[0, 20:].tolist() == free[:3]


def test_returned_cache_holds_only_survivors_from_the_start_layer(one_thread):
    model = build_model("llama")
    ids = random_ids(1, 30)
    with halting(model, _config(0.5)):
        output = model.generate(ids, max_new_tokens=NEW, return_dict_in_generate=True, **GREEDY)
    cache = output.past_key_values
    kept, fed = cache.state.stats.kept_tokens[0], 30 + NEW - 1  # the last token is never fed back
    assert isinstance(cache, DashCache) and kept == 15 and cache.get_seq_length() == fed
    assert [layer.keys.shape[2] for layer in cache.layers] == [fed] + [kept + NEW - 1] * 3


def test_direct_forward_calls_prefill_then_decode_like_the_library(one_thread):
    model = build_model("phi3")
    ids, token = random_ids(2, 24), torch.tensor([[5], [9]])
    state = prefill(model, ids, _config(0.5))
    expected = [state.logits, decode_step(model, state, token)]
    with halting(model, _config(0.5)):
        first = model(ids, logits_to_keep=1)
        second = model(token, **{CACHE: _cache(first)})
    torch.testing.assert_close(first.logits[:, -1], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(second.logits[:, -1], expected[1], rtol=0, atol=0)


def _filled_cache(model, ids):
    return _cache(model(ids, use_cache=True))


@pytest.mark.parametrize("options,message", [
    (dict(num_beams=2), "beam search is not supported under dash_prefill.halting"),
    (dict(num_beams=2, do_sample=True), "beam sample is not supported"),
    (dict(prompt_lookup_num_tokens=3), "assisted generation is not supported"),
    (dict(assistant_model="tiny"), "assisted generation is not supported"),
    (dict(cache_implementation="static"), "cache_implementation='static' is not supported"),
    (dict(cache_implementation="offloaded"), "cache_implementation='offloaded' is not supported"),
    (dict(cache_implementation="quantized"), "cache_implementation='quantized' is not supported"),
    (dict(prefill_chunk_size=8), "prefill_chunk_size is not supported"),
    (dict(past_key_values="filled"), "a prompt already holding past_key_values is not supported"),
    (dict(position_ids=torch.arange(20)[None]), "position_ids are not supported"),
    (dict(use_cache=False), "use_cache=False is not supported"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions=True is not supported"),
    (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states=True is not supported"),
])
def test_what_cannot_work_is_a_one_line_error_saying_what_to_do(options, message, one_thread):
    model = build_model("llama")
    ids = random_ids(1, 20)
    if options.get("assistant_model") == "tiny":
        options["assistant_model"] = build_model("llama", seed=1)
    if options.get("past_key_values") == "filled":
        options["past_key_values"] = _filled_cache(model, ids[:, :10])
    with halting(model, _config(0.5)):
        with pytest.raises(ValueError, match=message) as error:
            model.generate(ids, max_new_tokens=4, **options)
    assert "\n" not in str(error.value)


def test_inputs_embeds_is_an_error_that_asks_for_input_ids(one_thread):
    model = build_model("llama")
    embeds = model.get_input_embeddings()(random_ids(1, 20))
    with halting(model, _config(0.5)):
        with pytest.raises(ValueError, match="inputs_embeds is not supported.*pass input_ids"):
            model.generate(inputs_embeds=embeds, max_new_tokens=4)


def test_a_cache_that_is_not_a_plain_dynamic_cache_is_refused(one_thread):
    from transformers import StaticCache
    model = build_model("llama")
    ids = random_ids(1, 20)
    static = StaticCache(config=model.config, max_cache_len=32)
    offloaded = DynamicCache(offloading=True)
    with halting(model, _config(0.5)):
        for cache, name in ((static, "StaticCache"), (offloaded, "an offloaded DynamicCache")):
            with pytest.raises(ValueError, match=f"{name} is not supported"):
                model(ids, **{CACHE: cache})
        with pytest.raises(ValueError, match="already holding past_key_values"):
            model(ids, **{CACHE: _filled_cache(build_model("llama"), ids)})


def test_a_dash_cache_outside_the_block_is_refused_by_the_plain_forward(one_thread):
    model = build_model("llama")
    ids = random_ids(1, 20)
    with halting(model, _config(0.5)):
        cache = _cache(model(ids))
    with pytest.raises(ValueError, match="only be decoded inside dash_prefill.halting"):
        model(torch.tensor([[5]]), **{CACHE: cache})


def test_nesting_bad_configs_and_unsupported_families_are_refused():
    model = build_model("llama")
    with halting(model, _config(0.5)):
        with pytest.raises(ValueError, match="already inside dash_prefill.halting"):
            with halting(model, _config(0.5)):
                pass
    with pytest.raises(ValueError, match="config must be a DashConfig"):
        with halting(model, {"halt_ratio": 0.5}):
            pass
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        with halting(gpt2, _config(0.5)):
            pass
