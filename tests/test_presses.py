"""Presses compress exactly: the pruned cache gives the logits of a full pass that masks what was dropped."""

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, tiny_model
from transformers import StaticCache
from transformers.modeling_utils import AttentionInterface

import kvlib
from kvlib.presses import PrefillLayer, n_kept

PREFIX, SUFFIX = 64, 16
# Small windows so that every press has real work to do on a 64-token prefix.
PRESS_OPTIONS = {
    "knorm": {},
    "snapkv": {"window_size": 8},
    "streaming_llm": {"n_sink": 4},
    "lagkv": {"n_sink": 4, "lag_size": 8},
    "random": {"seed": 1},
    "tova": {},
    "observed_attention": {},
    "expected_attention": {"n_future_positions": 512, "n_sink": 4},
    "keydiff": {},
    "pyramidkv": {"window_size": 8},
    "kvzip": {"n_sink": 4, "chunk_size": 24},  # three reconstruction chunks of the 64-token prefix
}


def token_ids(batch: int = 2, length: int = PREFIX + SUFFIX, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def pressed_suffix_logits(model, press, ids):
    cache = kvlib.new_cache(model)
    with press(model):
        prefill_logits = model(ids[:, :PREFIX], cache=cache, use_cache=True).logits
    return prefill_logits, kvlib.extend(model, ids[:, PREFIX:], cache, PREFIX), cache


@torch.no_grad()
def oracle_suffix_logits(model, ids, kept_indices):
    """One full forward pass over prefix+suffix; each suffix query of each head is masked from the prefix
    positions that head's cache dropped, in that layer. Everything else is the model's own causal (or
    sliding-window) mask."""
    batch, length = ids.shape
    q_heads = model.config.num_attention_heads
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    hooks = []

    def install(module):
        window = getattr(module, "sliding_window", None)
        allowed = key <= query
        if window is not None:
            allowed = allowed & (key > query - window)
        allowed = allowed.expand(batch, q_heads, length, length).clone()
        kept = kept_indices.get(module.layer_idx)
        if kept is not None:
            keep_prefix = torch.zeros(batch, kept.shape[1], PREFIX, dtype=torch.bool).scatter_(2, kept, True)
            keep_prefix = keep_prefix.repeat_interleave(q_heads // kept.shape[1], dim=1)
            allowed[:, :, PREFIX:, :PREFIX] &= keep_prefix[:, :, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def replace_mask(_module, args, kwargs):
            assert "attention_mask" in kwargs, "oracle needs the mask passed by keyword"
            return args, {**kwargs, "attention_mask": additive}

        hooks.append(module.register_forward_pre_hook(replace_mask, with_kwargs=True))

    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            install(module)
    try:
        return model(ids, use_cache=False).logits[:, PREFIX:]
    finally:
        for hook in hooks:
            hook.remove()


def layer_budget(press, model, layer_idx: int) -> int:
    """Prefix positions each KV head of a layer keeps, by the press's own budget (it may vary by layer)."""
    empty = torch.empty(0)
    n_layers = model.config.get_text_config().num_hidden_layers
    return press.budget(PREFIX, PrefillLayer(layer_idx, n_layers, empty, empty, empty, 1.0))


def full_attention_layers(model) -> list[int]:
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", sorted(PRESS_OPTIONS))
def test_pruned_cache_equals_masked_full_pass(model, name, ratio):
    press = kvlib.load_press(name, compression_ratio=ratio, **PRESS_OPTIONS[name])
    ids = token_ids()
    _, logits, cache = pressed_suffix_logits(model, press, ids)
    report = press.last_report

    assert sorted(report.kept_indices) == full_attention_layers(model)
    for layer_idx, kept in report.kept_indices.items():
        expected_kept = layer_budget(press, model, layer_idx)
        assert 0 < expected_kept <= PREFIX
        assert kept.shape == (2, cache.layers[layer_idx].keys.shape[1], expected_kept)
        assert cache.layers[layer_idx].keys.shape[-2] == expected_kept + SUFFIX
        assert torch.all(kept[..., 1:] > kept[..., :-1]), "kept positions are distinct and ascending"

    oracle = oracle_suffix_logits(model, ids, report.kept_indices)
    error = (logits - oracle).abs().max().item()
    assert error < 1e-4, f"{name} at {ratio}: max |Δlogit| = {error:.2e}"


@pytest.mark.parametrize("name", sorted(PRESS_OPTIONS))
def test_ratio_zero_is_bit_identical(model, name):
    ids = token_ids()
    plain_prefill, plain_suffix, _ = pressed_suffix_logits(model, kvlib.load_press("none"), ids)
    press = kvlib.load_press(name, compression_ratio=0.0, **PRESS_OPTIONS[name])
    prefill, suffix, _ = pressed_suffix_logits(model, press, ids)
    assert torch.equal(prefill, plain_prefill) and torch.equal(suffix, plain_suffix)


def test_gemma3_reports_effective_ratio_over_whole_cache():
    model = tiny_model("gemma3")
    press = kvlib.load_press("knorm", compression_ratio=0.5)
    pressed_suffix_logits(model, press, token_ids())
    window_kept = model.config.sliding_window - 1  # a sliding layer stores its last window - 1 positions
    before = 2 * window_kept + PREFIX
    after = 2 * window_kept + n_kept(PREFIX, 0.5)
    assert press.last_report.effective_ratio == pytest.approx(1 - after / before)
    assert 0 < press.last_report.effective_ratio < 0.5


@pytest.mark.parametrize("name", sorted(PRESS_OPTIONS))
def test_batch_rows_are_pruned_independently(name):
    model = tiny_model("llama")
    press = kvlib.load_press(name, compression_ratio=0.5, **PRESS_OPTIONS[name])
    ids = torch.cat([token_ids(1, seed=1), token_ids(1, seed=2)])
    _, batch_logits, _ = pressed_suffix_logits(model, press, ids)
    batch_kept = press.last_report.kept_indices
    for row in range(2):
        _, row_logits, _ = pressed_suffix_logits(model, press, ids[row : row + 1])
        for layer_idx, kept in press.last_report.kept_indices.items():
            assert torch.equal(kept[0], batch_kept[layer_idx][row])
        assert (row_logits[0] - batch_logits[row]).abs().max() < 1e-5
    if name not in ("streaming_llm", "random"):  # positions chosen by content differ between different rows
        assert any(not torch.equal(kept[0], kept[1]) for kept in batch_kept.values())


@pytest.mark.parametrize("name", sorted(PRESS_OPTIONS))
def test_sdpa_and_eager_agree(name):
    ids = token_ids()
    logits, kept = [], []
    for implementation in ("eager", "sdpa"):
        model = tiny_model("llama", attn_implementation=implementation)
        press = kvlib.load_press(name, compression_ratio=0.5, **PRESS_OPTIONS[name])
        logits.append(pressed_suffix_logits(model, press, ids)[1])
        kept.append(press.last_report.kept_indices)
    assert all(torch.equal(kept[0][layer], kept[1][layer]) for layer in kept[0])
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_context_exit_leaves_nothing_behind():
    model = tiny_model("gpt_neox", attn_implementation="sdpa")
    registry_before = dict(AttentionInterface._global_mapping)
    press = kvlib.load_press("knorm", compression_ratio=0.5)
    pressed_suffix_logits(model, press, token_ids())
    assert AttentionInterface._global_mapping == registry_before
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    eager_model = tiny_model("llama", attn_implementation="eager")
    pressed_suffix_logits(eager_model, press, token_ids())
    assert "eager" not in AttentionInterface._global_mapping


def test_positions_continue_from_uncompressed_prefix_length():
    """Feeding the suffix at the cache's own length (what transformers does by default) gives other logits."""
    model = tiny_model("llama")
    press = kvlib.load_press("knorm", compression_ratio=0.5)
    ids = token_ids()
    _, right, cache = pressed_suffix_logits(model, press, ids)
    cache = kvlib.new_cache(model)
    with press(model):
        model(ids[:, :PREFIX], cache=cache, use_cache=True)
    with torch.no_grad():
        wrong = model(ids[:, PREFIX:], cache=cache, use_cache=True).logits
    assert (right - wrong).abs().max() > 1e-3


# --- misuse ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_ratio_out_of_range_names_the_value(ratio):
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\).*" + str(ratio)[:3]):
        kvlib.load_press("knorm", compression_ratio=ratio)


def test_unknown_press_and_option():
    with pytest.raises(ValueError, match="unknown press 'h2o'.*knorm"):
        kvlib.load_press("h2o", compression_ratio=0.5)
    with pytest.raises(ValueError, match="unknown option.*windowsize.*window_size"):
        kvlib.load_press("snapkv", compression_ratio=0.5, windowsize=8)
    with pytest.raises(ValueError, match="'none' press removes nothing"):
        kvlib.load_press("none", compression_ratio=0.5)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("snapkv", {"window_size": 64}, "snapkv press needs a prefix of at least"),
        ("lagkv", {"lag_size": 32}, "lagkv press needs a prefix of at least 68"),
        ("streaming_llm", {"n_sink": 64}, "streaming_llm press needs a prefix of at least 65"),
    ],
)
def test_prefix_too_short(name, options, message):
    model = tiny_model("llama")
    press = kvlib.load_press(name, compression_ratio=0.5, **options)
    with pytest.raises(ValueError, match=message):
        pressed_suffix_logits(model, press, token_ids())


def test_snapkv_must_keep_its_window():
    press = kvlib.load_press("snapkv", compression_ratio=0.9, window_size=8)
    assert press.min_prefix_length() == 71  # 71 - int(63.9) = 8 kept; 70 - int(63.0) = 7
    press.check_prefix_length(71)
    with pytest.raises(ValueError, match="at least 71"):
        press.check_prefix_length(70)


def test_unsupported_models_name_what_is_missing():
    press = kvlib.load_press("knorm", compression_ratio=0.5)
    with pytest.raises(TypeError, match="config._attn_implementation is missing"):
        with press(torch.nn.Linear(2, 2)):
            pass
    model = tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=PREFIX)
    with pytest.raises(TypeError, match="layer 0 is a StaticLayer.*DynamicCache"):
        with press(model), torch.no_grad():
            model(token_ids()[:, :PREFIX], cache=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="already active"):
        with press(model), press(model):
            pass


def test_kvpress_style_call_with_past_key_values():
    """The convention kvpress users know: `past_key_values=cache` (transformers 5.24 still accepts the old name)."""
    model = tiny_model("llama")
    cache = kvlib.new_cache(model)
    with kvlib.load_press("knorm", compression_ratio=0.5)(model), torch.no_grad(), pytest.warns(FutureWarning):
        model(token_ids()[:, :PREFIX], past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape[-2] == n_kept(PREFIX, 0.5)
