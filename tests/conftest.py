"""Tiny random models of every supported family, built offline in milliseconds.

DASH_TEST_DEVICE=cuda runs the same tests on a GPU (every tensor factory defaults there).
"""

import os

if not os.environ.get("DASH_TEST_DEVICE"):  # Triton kernels run in Triton's CPU interpreter; set
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

if os.environ.get("DASH_TEST_DEVICE"):
    torch.set_default_device(os.environ["DASH_TEST_DEVICE"])

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON)),
    # Mistral with a window shorter than the test prompts, so the window bites after compaction.
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**COMMON, sliding_window=12)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, head_dim=16)),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**COMMON)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
}
IMPLEMENTATIONS = ("sdpa", "eager")


def build_model(family: str, implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A tiny random model of ``family`` in eval mode."""
    model_class, make_config = FAMILIES[family]
    config = make_config()
    config._attn_implementation = implementation
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    # Random init leaves norms at 1 and updates tiny; spread the weights so scores differ.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture
def one_thread():
    """Run a test single-threaded (tiny ops on a shared CPU are faster that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param


def random_ids(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, COMMON["vocab_size"], (batch, seq_len), generator=generator, device="cpu")
    return ids.to(torch.get_default_device())
