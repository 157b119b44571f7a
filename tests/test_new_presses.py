"""The presses added after the first five: what the oracle and parity tests do not show on their own.

Option checks, the rotary read-back of expected_attention (pre-RoPE queries and future rotations, on every
architecture), bounded-memory chunking, PyramidKV's uneven layers, and KVzip's extra passes (run inside the
press, without recursion, leaving the shared cache alone, with the tokenizer's own prompt).
"""

import math
import sys

import pytest
import torch
from test_presses import PREFIX, PRESS_OPTIONS, SUFFIX, pressed_suffix_logits, token_ids
from tiny_models import CONFIGS, tiny_model

import kvlib
from kvlib.presses import expected_attention, kvzip, n_kept, observed_attention
from kvlib.presses.base import _rescore_key
from kvlib.presses.expected_attention import rotary_frequencies, unrotate

NEW = ["tova", "observed_attention", "expected_attention", "keydiff", "pyramidkv", "kvzip"]


def test_new_presses_are_registered_with_kvpress_defaults():
    assert set(NEW) <= set(kvlib.PRESSES)
    options = kvlib.list_presses()
    assert options["tova"] == options["observed_attention"] == options["keydiff"] == {}
    assert options["expected_attention"] == {
        "n_future_positions": 512,
        "n_sink": 4,
        "use_covariance": True,
        "use_vnorm": True,
        "epsilon": 0.0,
    }
    assert options["pyramidkv"] == {"window_size": 64, "kernel_size": 5, "beta": 20}
    assert options["kvzip"] == {"n_sink": 4, "chunk_size": 2048}


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("expected_attention", {"n_future_positions": 0}, "option n_future_positions must be an integer >= 1; got 0"),
        ("expected_attention", {"n_sink": -1}, "option n_sink must be an integer >= 0; got -1"),
        ("expected_attention", {"use_covariance": 1}, "option use_covariance must be true or false; got 1"),
        ("expected_attention", {"use_vnorm": "yes"}, "option use_vnorm must be true or false; got 'yes'"),
        ("expected_attention", {"epsilon": -0.5}, "option epsilon must be a number >= 0.0; got -0.5"),
        ("expected_attention", {"epsilon": float("nan")}, "option epsilon must be a number >= 0.0; got nan"),
        ("pyramidkv", {"beta": 0}, "option beta must be an integer >= 1; got 0"),
        ("pyramidkv", {"beta": 2.5}, "option beta must be an integer >= 1; got 2.5"),
        ("pyramidkv", {"kernel_size": 4}, "option kernel_size must be an integer >= 1 odd; got 4"),
        ("pyramidkv", {"window_size": 0}, "option window_size must be an integer >= 1; got 0"),
        ("kvzip", {"chunk_size": 0}, "option chunk_size must be an integer >= 1; got 0"),
        ("kvzip", {"n_sink": True}, "option n_sink must be an integer >= 0; got True"),
    ],
)
def test_bad_options_name_option_value_and_what_is_allowed(name, options, message):
    with pytest.raises(ValueError, match=f"^{name} press {message}$".replace("(", r"\(").replace(")", r"\)")):
        kvlib.load_press(name, compression_ratio=0.5, **options)


@pytest.mark.parametrize("name, option", [("kvzip", "layerwise"), ("kvzip", "tokenizer"), ("tova", "window_size")])
def test_options_kvlib_does_not_offer(name, option):
    with pytest.raises(ValueError, match=f"unknown option.*{option}"):
        kvlib.load_press(name, compression_ratio=0.5, **{option: 1})


@pytest.mark.parametrize(
    "name, options, need",
    [
        ("tova", {}, 2),
        ("expected_attention", {"n_sink": 8}, 9),
        ("pyramidkv", {"window_size": 64}, 65),
    ],
)
def test_prefix_too_short(name, options, need):
    press = kvlib.load_press(name, compression_ratio=0.5, **options)
    press.check_prefix_length(need)
    with pytest.raises(ValueError, match=f"{name} press needs a prefix of at least {need}"):
        press.check_prefix_length(need - 1)


# --- expected attention: reading the model's rotary back ---------------------------------------------------------


def rotary_module(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_pre_rope_queries_and_future_rotations_are_the_models(arch, monkeypatch):
    """Un-rotated queries equal what the model fed to RoPE (partial rotary included); the rotation read from the
    tables continues the model's own rotary embedding at future positions."""
    model = tiny_model(arch)
    modeling = sys.modules[type(model).__module__]
    pre_rope = []

    def recording(q, k, cos, sin, *args, **kwargs):
        pre_rope.append(q)
        return apply(q, k, cos, sin, *args, **kwargs)

    apply = modeling.apply_rotary_pos_emb
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording)
    press = kvlib.load_press("expected_attention", compression_ratio=0.5)
    ids = token_ids(batch=2)[:, :PREFIX]
    shared = kvlib.SharedPrefill.run(model, ids, [press])
    monkeypatch.undo()
    assert len(pre_rope) == model.config.num_hidden_layers
    for layer_idx, layer in shared.layers.items():
        cos, sin = layer.rotary
        start, step, scale = rotary_frequencies(cos, sin)
        torch.testing.assert_close(unrotate(layer.queries, cos, sin, scale), pre_rope[layer_idx], rtol=1e-5, atol=1e-5)
        assert torch.allclose(scale, torch.ones_like(scale))
        future = torch.arange(PREFIX, PREFIX + 512)[None]
        rotary = rotary_module(model)
        extra = {"layer_type": "full_attention"} if isinstance(rotary.rope_type, dict) else {}  # Gemma 3: per type
        model_cos, model_sin = rotary(layer.queries, future, **extra)
        angles = start[:, None] + step[:, None] * future[0, :, None].double()
        for ours, theirs in ((angles.cos(), model_cos), (angles.sin(), model_sin)):
            ours, theirs = torch.broadcast_tensors(torch.cat((ours, ours), dim=-1).float(), theirs)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


def test_rotary_frequencies_recover_scale_and_offset():
    n, inv_freq = 40, 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    positions = torch.arange(7, 7 + n, dtype=torch.float64)  # tables need not start at position 0
    angles = positions[:, None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[None]
    start, step, scale = rotary_frequencies((emb.cos() * 1.25).float(), (emb.sin() * 1.25).float())
    torch.testing.assert_close(step[0], inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(start[0], torch.remainder(7 * inv_freq + math.pi, 2 * math.pi) - math.pi)
    assert scale.item() == pytest.approx(1.25, rel=1e-6)


def test_rotary_frequencies_refuse_what_they_cannot_extrapolate():
    angles = torch.rand(1, 20, 4, generator=torch.Generator().manual_seed(0)) * 3  # not linear in the position
    emb = torch.cat((angles, angles), dim=-1)
    with pytest.raises(ValueError, match="do not grow linearly with the position"):
        rotary_frequencies(emb.cos(), emb.sin())
    with pytest.raises(ValueError, match="not transformers' rotate_half layout"):
        rotary_frequencies(torch.rand(1, 20, 8), torch.rand(1, 20, 8))


def test_expected_attention_refuses_models_without_rotary_tables():
    press = kvlib.load_press("expected_attention", compression_ratio=0.5)
    keys = torch.randn(1, 2, 16, 8)
    layer = kvlib.PrefillLayer(0, 1, torch.randn(1, 4, 16, 8), keys, keys, 8**-0.5, rotary=None)
    with pytest.raises(ValueError, match="needs the model's rotary tables"):
        press.keep(layer)


# --- bounded memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, module", [("observed_attention", observed_attention), ("expected_attention", expected_attention)]
)
def test_chunked_scores_do_not_depend_on_the_chunk(name, module, monkeypatch):
    model = tiny_model("llama")
    ids = token_ids(batch=2)[:, :PREFIX]
    press = kvlib.load_press(name, compression_ratio=0.5, **PRESS_OPTIONS[name])
    shared = kvlib.SharedPrefill.run(model, ids, [press])
    whole = {idx: press.layer_scores(layer) for idx, layer in shared.layers.items()}
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1000)  # a few queries at a time
    for idx, layer in shared.layers.items():
        torch.testing.assert_close(press.layer_scores(layer), whole[idx], rtol=1e-5, atol=1e-7)


def test_kvzip_scores_do_not_depend_on_the_query_block(monkeypatch):
    model = tiny_model("qwen2")
    ids = token_ids(batch=2)[:, :PREFIX]
    press = kvlib.load_press("kvzip", compression_ratio=0.5, **PRESS_OPTIONS["kvzip"])
    whole = kvlib.SharedPrefill.run(model, ids, [press]).rescored[_rescore_key(press)]
    monkeypatch.setattr(kvzip, "CHUNK_ELEMENTS", 500)
    blocked = kvlib.SharedPrefill.run(model, ids, [press]).rescored[_rescore_key(press)]
    for idx in whole:
        torch.testing.assert_close(blocked[idx], whole[idx], rtol=1e-5, atol=1e-7)


# --- PyramidKV: layers of different lengths --------------------------------------------------------------------


def test_pyramid_budgets_shrink_with_depth_and_total_the_ratio():
    press = kvlib.load_press("pyramidkv", compression_ratio=0.5, window_size=8)
    layers = [kvlib.PrefillLayer(i, 8, *(torch.empty(0),) * 3, 1.0) for i in range(8)]
    budgets = [press.budget(1000, layer) for layer in layers]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] >= 8
    assert sum(budgets) == pytest.approx(8 * 500, abs=8)
    # where the pyramid does not fit, every layer keeps round(n * (1 - ratio)), as kvpress does
    steep = kvlib.load_press("pyramidkv", compression_ratio=0.9, window_size=64)
    assert {steep.budget(100, layer) for layer in layers} == {10}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_uneven_layers_decode_token_by_token(implementation):
    """A pruned cache whose layers hold different lengths gives the same logits fed at once or one at a time."""
    model = tiny_model("llama", attn_implementation=implementation)
    press = kvlib.load_press("pyramidkv", compression_ratio=0.5, **PRESS_OPTIONS["pyramidkv"])
    ids = token_ids()
    _, at_once, cache = pressed_suffix_logits(model, press, ids)
    lengths = [layer.keys.shape[-2] - SUFFIX for layer in cache.layers]
    assert len(set(lengths)) == 3 and lengths[0] > lengths[-1], "the layers really hold different lengths"
    assert kvlib.kv_bytes(cache) < kvlib.kv_bytes(pressed_suffix_logits(model, kvlib.load_press("none"), ids)[2])
    cache = kvlib.new_cache(model)
    with press(model), torch.no_grad():
        model(ids[:, :PREFIX], cache=cache, use_cache=True)
    with torch.no_grad():
        steps = [kvlib.extend(model, ids[:, i : i + 1], cache, i) for i in range(PREFIX, PREFIX + SUFFIX)]
    assert (torch.cat(steps, dim=1) - at_once).abs().max() < 1e-4


# --- KVzip's extra passes --------------------------------------------------------------------------------------


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kvzip_passes_run_inside_the_press_once_per_chunk(arch):
    model = tiny_model(arch)
    press = kvlib.load_press("kvzip", compression_ratio=0.5, n_sink=4, chunk_size=24)
    ids = token_ids(batch=2)
    calls, handle = count_forwards(model)
    try:
        cache = kvlib.new_cache(model)
        with press(model), torch.no_grad():
            model(ids[:, :PREFIX], cache=cache, use_cache=True)
            inside = len(calls)
        with torch.no_grad():
            kvlib.extend(model, ids[:, PREFIX:], cache, PREFIX)
    finally:
        handle.remove()
    assert inside == 1 + math.ceil(PREFIX / 24), "the prefill, then one reconstruction pass per chunk"
    assert len(calls) == inside + 1
    for layer_idx, kept in press.last_report.kept_indices.items():
        assert kept.shape[-1] == n_kept(PREFIX, 0.5)
        assert cache.layers[layer_idx].keys.shape[-2] == n_kept(PREFIX, 0.5) + SUFFIX
        assert torch.equal(kept[..., :4], torch.arange(4).expand(2, kept.shape[1], 4)), "sinks are kept"


def test_kvzip_leaves_the_shared_cache_as_it_was():
    model = tiny_model("gemma3")  # sliding layers too
    ids = token_ids(batch=2)[:, :PREFIX]
    plain = kvlib.new_cache(model)
    with torch.no_grad():
        model(ids, cache=plain, use_cache=True)
    press = kvlib.load_press("kvzip", compression_ratio=0.5, chunk_size=24)
    shared = kvlib.SharedPrefill.run(model, ids, [press])
    assert list(shared.rescored[_rescore_key(press)]) == [1]  # the full-attention layer only
    for ours, theirs in zip(shared.cache.layers, plain.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert shared.query_bytes() == 2 * 2 * PREFIX * 4  # kvzip's scores: [batch, kv_heads, n] float32
    with pytest.raises(ValueError, match="was not among the presses given to SharedPrefill.run"):
        kvlib.load_press("kvzip", compression_ratio=0.5, chunk_size=25).prune(shared)


def test_kvzip_at_ratio_zero_runs_no_extra_pass():
    model = tiny_model("llama")
    calls, handle = count_forwards(model)
    try:
        with kvlib.load_press("kvzip")(model), torch.no_grad():
            model(token_ids()[:, :PREFIX], cache=kvlib.new_cache(model), use_cache=True)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_kvzip_names_a_missing_tokenizer(tmp_path):
    model = tiny_model("llama")
    model.config.name_or_path = str(tmp_path / "no-tokenizer-here")
    press = kvlib.load_press("kvzip", compression_ratio=0.5)
    with pytest.raises(ValueError, match="needs the model's tokenizer.*no-tokenizer-here.*press.tokenizer"):
        pressed_suffix_logits(model, press, token_ids())


def test_kvzip_uses_the_tokenizer_and_chat_template_saved_with_the_model(tiny_model_dir, smollm2_tokenizer):
    from kvlib.models import load_weights

    model = load_weights(str(tiny_model_dir), device="cpu", dtype="float32")
    press = kvlib.load_press("kvzip", compression_ratio=0.5, chunk_size=32)
    first, later, suffix = press._prompts(model)
    assert first == smollm2_tokenizer.encode(kvzip.FIRST_PROMPT, add_special_tokens=False)
    assert smollm2_tokenizer.decode(suffix).startswith("<|im_end|>")  # the assistant turn of its chat template
    ids = torch.randint(0, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    cache = kvlib.new_cache(model)
    with press(model), torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert all(layer.keys.shape[-2] == n_kept(80, 0.5) for layer in cache.layers)


def test_rotary_frequencies_accept_float32_tables_far_along_a_stream():
    """Read at their original positions, the queries of a long stream sit ~30k positions along: float32 tables there
    carry ~eps x 30k rad of rounding, which is not a non-linear rotation (streaming SmolLM2 hit this at 30k)."""
    inv_freq = 1.0 / (100000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    positions = torch.arange(31_744, 31_744 + 512, dtype=torch.float32)
    angles = positions[:, None] * inv_freq  # float32, as transformers computes them
    emb = torch.cat((angles, angles), dim=-1)[None]
    _, step, _ = rotary_frequencies(emb.cos(), emb.sin())
    torch.testing.assert_close(step[0], inv_freq.double(), rtol=0, atol=1e-5)
