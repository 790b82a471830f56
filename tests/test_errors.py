"""Bad input gets a clear error that says what to change."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import build_model, random_ids
from dash_prefill import DashConfig, prefill
from dash_prefill.hf.generation import generate


@pytest.mark.parametrize("kwargs,message", [
    ({"halt_ratio": 1.0}, r"halt_ratio must be in \[0, 1\); got 1.0"),
    ({"halt_ratio": -0.1}, r"halt_ratio must be in \[0, 1\)"),
    ({"halt_ratio": "half"}, r"halt_ratio must be a number"),
    ({"start_layer": 1.5}, r"fraction of depth and must be in \(0, 1\)"),
    ({"start_layer": -1}, r"start_layer must be >= 0"),
    ({"protect_last": -2}, r"protect_last must be an int >= 0"),
    ({"policy": "fastv"}, r"policy must be one of"),
    ({"score": "l1"}, r"score must be one of"),
    ({"later_gates": ((0.6, 0.4),)}, r"each later gate must halt more of the prompt than the gate before"),
    ({"later_gates": (0.6, 0.9)}, r"later_gates must be a tuple of \(start_layer, halt_ratio\) pairs"),
    ({"later_gates": ((0.6, 0.9),), "eligible": "image"}, r"later_gates work with eligible='all' only"),
])
def test_invalid_config_is_rejected_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DashConfig(**kwargs)


def test_a_later_gate_before_the_start_layer_names_both_layers():
    with pytest.raises(ValueError, match=r"later gate at layer 1 \(start_layer=1\) must come after the gate at layer 2"):
        prefill(build_model("llama"), random_ids(1, 10), DashConfig(start_layer=2, later_gates=((1, 0.8),)))


def test_start_layer_beyond_the_model_names_the_depth():
    with pytest.raises(ValueError, match=r"beyond the model, which has 4 layers"):
        prefill(build_model("llama"), random_ids(1, 10), DashConfig(start_layer=4))


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt is empty"):
        prefill(build_model("llama"), torch.zeros(1, 0, dtype=torch.long))


def test_over_long_prompt_names_the_context():
    with pytest.raises(ValueError, match=r"300 tokens but the model's context is 256"):
        prefill(build_model("llama"), random_ids(1, 300))


def test_right_padding_is_rejected_with_the_tokenizer_setting():
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        prefill(build_model("llama"), random_ids(2, 10), attention_mask=mask)


def test_unsupported_architecture_lists_the_supported_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama"):
        prefill(model, random_ids(1, 5))


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text):
        return {"input_ids": [ord(c) % 90 + 3 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_generate_rejects_empty_text_and_too_many_new_tokens():
    model = build_model("llama")
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, _Tokenizer(), "   ")
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        generate(model, _Tokenizer(), "x" * 250, max_new_tokens=10)


def test_offloaded_weights_are_rejected_with_the_device_map_advice():
    model = build_model("llama")
    weight = model.model.layers[1].mlp.up_proj.weight
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"))
    with pytest.raises(ValueError, match=r"offloaded .*device_map without CPU/disk offloading"):
        prefill(model, random_ids(1, 10))


@pytest.mark.parametrize("input_ids,message", [
    (torch.rand(1, 10) * 50, r"integer token ids \(torch.long\); got dtype torch.float32"),
    ([[5, 6, 7], [5, 6, 7, 8, 9]], r"different lengths \(3 to 5\): left-pad them and pass attention_mask"),
    ([torch.tensor([5, 6, 7]), torch.tensor([5, 6])], r"different lengths \(2 to 3\)"),
    # ids on the host are checked; ids already on a GPU are not read back (no host sync)
    (torch.tensor([[5, 6, 97]], device="cpu"), r"must lie in \[0, 97\) .*got ids from 5 to 97"),
    (torch.tensor([[-1, 6, 7]], device="cpu"), r"must lie in \[0, 97\)"),
    ("hello", r"input_ids must be a \(batch, seq\) tensor or list of integer token ids; got str"),
])
def test_bad_input_ids_are_rejected_naming_what_is_wrong(input_ids, message):
    with pytest.raises(ValueError, match=message):
        prefill(build_model("llama"), input_ids)


def test_a_list_of_equal_length_id_tensors_is_a_batch():
    model = build_model("llama")
    ids = random_ids(2, 12)
    assert torch.equal(prefill(model, list(ids)).logits, prefill(model, ids).logits)


def test_a_dict_instead_of_a_dash_config_is_rejected_by_prefill_and_generate():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"config must be a DashConfig.*got dict"):
        prefill(model, random_ids(1, 10), {"halt_ratio": 0.5})
    with pytest.raises(ValueError, match=r"config must be a DashConfig.*got dict"):
        generate(model, _Tokenizer(), "some text", {"halt_ratio": 0.5})


def test_generate_rejects_float_token_ids_naming_the_type():
    with pytest.raises(ValueError, match=r"token ids must be integers; got float 5.0"):
        generate(build_model("llama"), _Tokenizer(), [[5.0, 6.0, 7.0]])


def test_generate_checks_the_start_layer_before_the_prefill(monkeypatch):
    import dash_prefill.hf.generation as generation

    monkeypatch.setattr(generation, "prefill", lambda *a, **k: pytest.fail("prefill ran"))
    with pytest.raises(ValueError, match=r"start_layer=9 is beyond the model, which has 4 layers"):
        generate(build_model("llama"), _Tokenizer(), "some text", DashConfig(start_layer=9))
