"""Static decoding (preallocated caches, a CUDA graph per step on a GPU) against dynamic decoding.

On a CPU the static step runs eagerly; the CUDA tests run with DASH_TEST_DEVICE=cuda.
"""

import gc
import os
import weakref

import pytest
import torch

from conftest import build_model, random_ids
from dash_prefill import DashConfig, decode_step, prefill
from dash_prefill.hf.generation import generate
from dash_prefill.hf.static_decode import _KEPT, GraphedStep, StaticDecoder, release_buffers, static_step
from test_errors import _Tokenizer
from test_vlm import GRIDS
from vlms import BUILDERS, build_vlm, vlm_inputs

CUDA = os.environ.get("DASH_TEST_DEVICE") == "cuda"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs DASH_TEST_DEVICE=cuda")


def _config(ratio, **extra):
    return DashConfig(halt_ratio=ratio, start_layer=1, protect_first=2, protect_last=3, **extra)


def _padded():
    short = torch.cat([torch.zeros(11, dtype=torch.long), random_ids(1, 19, seed=4)[0]])
    ids = torch.stack([random_ids(1, 30, seed=3)[0], short])
    return ids, (torch.arange(30)[None] >= torch.tensor([0, 11])[:, None]).long()


def _both(model, ids, mask, config, **options):
    """token_ids of generate with static_decode off and on."""
    return [generate(model, _Tokenizer(), ids, config, max_new_tokens=10, attention_mask=mask,
                     static_decode=static, **options).token_ids for static in (False, True)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_static_decoding_gives_the_tokens_of_dynamic_decoding(family, implementation, padded, ratio, one_thread):
    model = build_model(family, implementation)
    ids, mask = _padded() if padded else (random_ids(1, 30), torch.ones(1, 30, dtype=torch.long))
    dynamic, static = _both(model, ids, mask, _config(ratio), eos_token_id=[])
    assert static == dynamic


def test_static_step_logits_match_decode_step_past_the_sliding_window(family, one_thread):
    # 30-token prompts and 10 new tokens: Mistral's window (12) and Gemma-3's (8) bite.
    model = build_model(family)
    ids, mask = _padded()
    dynamic, static = prefill(model, ids, _config(0.5), mask), prefill(model, ids, _config(0.5), mask)
    decoder = StaticDecoder(model, static, 10)
    token = dynamic.logits.argmax(-1)[:, None]
    for _ in range(10):
        expected = decode_step(model, dynamic, token)
        torch.testing.assert_close(decoder.step(token), expected, atol=1e-5, rtol=1e-5)
        token = expected.argmax(-1)[:, None]


def test_stop_tokens_decode_statically_as_dynamically(one_thread):
    model = build_model("gemma3")
    ids, mask = _padded()
    config = _config(0.5)
    dynamic, static = _both(model, ids, mask, config, eos_token_id=[])
    assert static == dynamic
    stop = dynamic[1][3]  # row 1 stops early; the static path reads the stop check later
    dynamic, static = _both(model, ids, mask, config, eos_token_id=stop)
    assert static == dynamic and len(dynamic[1]) < 10


def test_seeded_sampling_draws_the_same_tokens_statically(one_thread):
    model = build_model("qwen3")
    ids, mask = _padded()
    sampling = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7, eos_token_id=[])
    dynamic, static = _both(model, ids, mask, _config(0.25), **sampling)
    assert static == dynamic


@pytest.mark.parametrize("vlm", list(BUILDERS))
def test_vlm_static_decoding_continues_at_the_rotary_offset(vlm, one_thread):
    model = build_vlm(vlm)
    inputs = vlm_inputs(model, images=2, grids=GRIDS)
    ids = inputs.pop("input_ids")
    dynamic, static = _both(model, ids, torch.ones_like(ids), _config(0.5), eos_token_id=[], **inputs)
    assert static == dynamic


def test_on_a_cpu_the_static_step_runs_eagerly_and_flash_attention_is_refused(one_thread):
    if CUDA:
        pytest.skip("checks the CPU fallback")
    model = build_model("llama")
    step = static_step(model, prefill(model, random_ids(1, 20), _config(0.5)), 4)
    assert not isinstance(step, GraphedStep) and step.__self__.count.device.type == "cpu"
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2 cannot"):
        StaticDecoder(model, prefill(build_model("llama"), random_ids(1, 20), _config(0.5)), 4)


@needs_cuda
@pytest.mark.parametrize("padded", [False, True])
def test_graphed_decoding_gives_the_tokens_of_eager_decoding(family, padded):
    model = build_model(family)
    ids, mask = _padded() if padded else (random_ids(1, 30), torch.ones(1, 30, dtype=torch.long))
    dynamic, static = _both(model, ids, mask, _config(0.5), eos_token_id=[])
    assert static == dynamic


@needs_cuda
def test_graphed_steps_never_sync_the_host(family):
    model = build_model(family)
    ids, mask = _padded()
    state = prefill(model, ids.cuda(), _config(0.5), mask.cuda())
    step = static_step(model, state, 10)
    assert isinstance(step, GraphedStep)
    token = step(state.logits.argmax(-1)[:, None]).argmax(-1)[:, None]  # the first call captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            token = step(token).argmax(-1)[:, None]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grouped_sdpa_equals_hf_sdpa_which_repeats_the_keys():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dash_prefill.hf.decode import grouped_sdpa

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = torch.rand(2, 1, 1, 40) > 0.3
    mask[:, :, :, 0] = True
    ours, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (2, 1, 8, 16)
    torch.testing.assert_close(ours, theirs)
    # A wrong grouping (query heads paired with the wrong key head) would not match:
    swapped, _ = grouped_sdpa(module, query.flip(1), key, value, mask, scaling=0.3)
    assert not torch.allclose(swapped.flip(2), theirs)
    # Without a mask the one query sees every key, as in HF's sdpa:
    unmasked, _ = grouped_sdpa(module, query, key, value, None, scaling=0.3)
    torch.testing.assert_close(unmasked, sdpa_attention_forward(module, query, key, value, None, scaling=0.3)[0])
    assert not torch.allclose(unmasked, ours)


def test_the_compiled_step_keeps_single_query_attention_opaque(one_thread):
    # What inductor would compile: the traced graph calls the operator once a layer, so its
    # products are not regenerated as compiler kernels.
    model = build_model("llama")
    graphs = []

    def backend(graph_module, inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    decoder = StaticDecoder(model, prefill(model, random_ids(1, 30), _config(0.5)), 4)
    token = torch.ones(1, 1, dtype=torch.long)
    decoder.step(token, torch.compile(StaticDecoder.layers, dynamic=True, backend=backend))
    calls = sum(graph.count("dash_prefill.single_query_attention") for graph in graphs)
    assert calls == model.config.num_hidden_layers


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_traced_step_gives_the_eager_steps_logits_at_two_prompt_lengths(name, one_thread):
    # torch.compile's tracing (the aot_eager backend: no code generation, seconds on a CPU) of
    # the step, with its in-place cache writes and device counter, across a halted and a plain
    # prompt of another length (other cache shapes, one layout group instead of two).
    model = build_model(name)
    traced = torch.compile(StaticDecoder.layers, dynamic=True, backend="aot_eager")
    for length, ratio in ((30, 0.5), (41, 0.0)):
        ids = random_ids(2, length)
        eager, compiled = (StaticDecoder(model, prefill(model, ids, _config(ratio)), 6) for _ in range(2))
        token = torch.ones(2, 1, dtype=torch.long)
        for _ in range(4):  # past the prompt: written slots, masks and positions move on
            expected, got = eager.step(token), compiled.step(token, traced)
            torch.testing.assert_close(got, expected)
            token = expected.argmax(-1)[:, None]


@needs_cuda
@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen3", "phi3"])
def test_compiled_decoding_gives_the_tokens_of_eager_decoding(name):
    model = build_model(name)
    ids, mask = _padded()
    options = dict(max_new_tokens=10, attention_mask=mask, eos_token_id=[])
    eager = generate(model, _Tokenizer(), ids, _config(0.5), **options).token_ids
    compiled = generate(model, _Tokenizer(), ids, _config(0.5), static_decode="compiled", **options).token_ids
    assert compiled == eager


def _storages(decoder):
    return {t.untyped_storage().data_ptr() for t in decoder.buffers()}


def test_a_kept_decoder_leaves_its_buffers_to_the_next_one_of_the_same_shapes(one_thread):
    model = build_model("llama")
    release_buffers(model)
    state = lambda length, seed: prefill(model, random_ids(1, length, seed=seed), _config(0.5))  # noqa: E731
    first = _storages(StaticDecoder(model, state(30, 1), 6, keep=True))  # the decoder is gone at once
    assert _storages(StaticDecoder(model, state(30, 2), 6, keep=True)) == first
    assert _storages(StaticDecoder(model, state(70, 3), 6, keep=True)) != first  # more slots: new buffers
    release_buffers(model)


@pytest.mark.skipif(CUDA, reason="on a GPU the compiled step is graphed and keeps its buffers, by design")
def test_compiled_decoding_keeps_no_buffers_where_it_runs_eagerly(one_thread):
    model = build_model("llama")
    release_buffers(model)
    ids = random_ids(1, 30)
    generate(model, _Tokenizer(), ids, _config(0.5), max_new_tokens=4, static_decode="compiled", eos_token_id=[])
    assert model not in _KEPT


@needs_cuda
def test_a_compiled_decoder_reuses_the_buffers_the_last_one_left_and_keeps_its_tokens(one_thread):
    # Same addresses call after call: torch.compile's CUDA graphs replay instead of recording anew.
    # Prompts of two lengths in turn: buffers whose shapes no longer fit are replaced.
    model = build_model("llama")
    release_buffers(model)
    calls = [(random_ids(1, 30, seed=1), 0.5), (random_ids(1, 30, seed=2), 0.5), (random_ids(1, 41, seed=3), 0.0),
             (random_ids(1, 30, seed=4), 0.5)]
    seen = []
    for ids, ratio in calls:
        options = dict(max_new_tokens=8, attention_mask=torch.ones_like(ids), eos_token_id=[])
        eager = generate(model, _Tokenizer(), ids, _config(ratio), **options).token_ids
        compiled = generate(model, _Tokenizer(), ids, _config(ratio), static_decode="compiled", **options).token_ids
        assert compiled == eager
        seen.append({t.data_ptr() for t in _KEPT[model][0]})
    assert seen[1] == seen[0]  # same shapes: every buffer reused
    assert seen[2] != seen[1]  # another length: the key and value buffers are new


def test_a_kept_decoder_in_use_is_never_shared_and_release_frees_its_buffers(one_thread):
    model = build_model("llama")
    ids = random_ids(1, 30)
    first = StaticDecoder(model, prefill(model, ids, _config(0.5)), 6, keep=True)
    second = StaticDecoder(model, prefill(model, ids, _config(0.5)), 6, keep=True)
    assert not _storages(first) & _storages(second)
    reference = StaticDecoder(model, prefill(model, ids, _config(0.5)), 6)
    token = torch.ones(1, 1, dtype=torch.long)
    for _ in range(3):
        second.step(token)  # written while ``first`` lives: ``first`` must not see it
        torch.testing.assert_close(first.step(token), reference.step(token))
    owner = weakref.ref(second)
    del first, second
    gc.collect()
    assert owner() is None and model in _KEPT
    release_buffers(model)
    assert model not in _KEPT


def test_a_decoder_traced_by_torch_compile_is_freed_after_its_call(one_thread):
    # Kept buffers are reused only once their decoder is gone: torch.compile must not hold it.
    model = build_model("llama")
    decoder = StaticDecoder(model, prefill(model, random_ids(1, 30), _config(0.5)), 4, keep=True)
    decoder.step(torch.ones(1, 1, dtype=torch.long), torch.compile(StaticDecoder.layers, dynamic=True, backend="aot_eager"))
    owner = weakref.ref(decoder)
    del decoder
    gc.collect()
    assert owner() is None


@pytest.mark.parametrize("mode", ["fast", 1, None])
def test_an_unknown_static_decode_mode_is_one_clear_error(mode):
    model = build_model("llama")
    with pytest.raises(ValueError, match="static_decode must be False, True .* or 'compiled'"):
        generate(model, _Tokenizer(), random_ids(1, 12), _config(0.5), max_new_tokens=2, static_decode=mode)


@pytest.fixture
def grouped_calls(monkeypatch):
    """The key shapes of every call of the registered grouped attention."""
    import dash_prefill.hf.decode as decode

    calls, real = [], decode.grouped_sdpa

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setitem(decode.AttentionInterface._global_mapping, decode.GROUPED_SDPA, counting)
    return calls


def test_eager_decoding_uses_grouped_sdpa_on_a_gpu_only(grouped_calls):
    from dash_prefill.hf.decode import decode_step

    model = build_model("llama")
    for ratio in (0.0, 0.5):  # unmasked and masked steps
        grouped_calls.clear()
        state = prefill(model, random_ids(1, 20), _config(ratio))
        decode_step(model, state, random_ids(1, 1))
        assert len(grouped_calls) == (model.config.num_hidden_layers if CUDA else 0)
        assert model.config._attn_implementation == "sdpa"


def test_the_static_step_calls_grouped_sdpa_on_every_layer_and_restores_sdpa(grouped_calls):
    model = build_model("llama")
    state = prefill(model, random_ids(1, 20), _config(0.5))
    decoder = StaticDecoder(model, state, 3)
    decoder.step(random_ids(1, 1))
    assert len(grouped_calls) == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"


def test_every_layers_slots_are_aligned_and_hold_the_cache_plus_the_new_tokens():
    from dash_prefill.hf.static_decode import SLOT_ALIGN

    model = build_model("gemma3")  # sliding layers hold fewer keys than full ones
    state = prefill(model, random_ids(1, 27), _config(0.5))
    cached = [layer.keys.shape[2] for layer in state.cache.layers]
    decoder = StaticDecoder(model, state, 7)
    for idx, (keys, values) in enumerate(zip(decoder.keys, decoder.values)):
        slots = keys.shape[2]
        assert slots % SLOT_ALIGN == 0 and cached[idx] + 7 <= slots < cached[idx] + 7 + SLOT_ALIGN
        assert values.shape[2] == slots == decoder.positions[decoder.group_of[idx]].shape[1]
    assert len(set(cached)) > 1
