"""Chunked prefill (compressing as the context is read) and re-rotated positions.

- One chunk at least as long as the context is today's one-shot prefill, bit for bit, for every press that can
  be chunked, on every tiny architecture; the presses that cannot are refused by name.
- Smaller chunks never let a layer hold more than budget + chunk positions, and give finite logits; with
  StreamingLLM (whose kept set is known in advance) they equal a full pass masked chunk by chunk.
- Re-rotated keys are the model's own pre-rotation keys rotated at their new positions (full and partial rotary,
  Gemma 3's local and global bases).
"""

import sys

import pytest
import torch
from test_presses import PREFIX, PRESS_OPTIONS, SUFFIX, full_attention_layers, token_ids
from tiny_models import CONFIGS, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import kvlib
from kvlib.cache import CachePolicy, Storage, extend
from kvlib.cache.chunked import check_policy, chunk_bounds, chunked_prefill, min_chunk
from kvlib.cache.layers import is_sliding
from kvlib.cache.positions import rotary_module
from kvlib.presses import base

REFUSED = {"lagkv", "kvzip"}
CHUNKABLE = sorted(set(PRESS_OPTIONS) - REFUSED)


def press(name: str, ratio: float = 0.5):
    return kvlib.load_press(name, compression_ratio=ratio, **PRESS_OPTIONS[name])


@torch.no_grad()
def prefill_and_suffix(model, policy, ids, logits_to_keep=1):
    logits, cache = policy.prefill(model, ids[:, :PREFIX], logits_to_keep=logits_to_keep)
    suffix = extend(model, ids[:, PREFIX:], cache, policy.next_position(cache, PREFIX))
    return logits, suffix, cache


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return tiny_model(request.param)


# --- one chunk = one shot -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHUNKABLE)
def test_one_chunk_is_bit_identical_to_one_shot(model, name):
    ids = token_ids()
    for ratio in (0.25, 0.75):
        pressed = press(name, ratio)
        one_shot = prefill_and_suffix(model, CachePolicy(pressed), ids)
        one_shot_kept = pressed.last_report.kept_indices
        for chunk in (PREFIX, PREFIX + 7):
            chunked = prefill_and_suffix(model, CachePolicy(pressed, prefill_chunk=chunk), ids)
            kept = pressed.last_report.kept_indices
            assert torch.equal(chunked[0], one_shot[0]) and torch.equal(chunked[1], one_shot[1]), (name, ratio)
            assert kept.keys() == one_shot_kept.keys() == set(full_attention_layers(model))
            assert all(torch.equal(kept[layer], one_shot_kept[layer]) for layer in kept)


def test_one_chunk_keeps_every_logit_asked_for():
    model, ids = tiny_model("llama"), token_ids()
    pressed = press("knorm")
    for keep in (0, 5):
        one_shot = CachePolicy(pressed).prefill(model, ids[:, :PREFIX], logits_to_keep=keep)[0]
        chunked = CachePolicy(pressed, prefill_chunk=PREFIX).prefill(model, ids[:, :PREFIX], logits_to_keep=keep)[0]
        assert torch.equal(chunked, one_shot)


def test_no_press_in_chunks_reads_as_one_pass():
    """Nothing pruned: a chunked prefill is the model's own chunked reading, equal to one pass up to float."""
    model, ids = tiny_model("gemma3"), token_ids()
    one_shot = prefill_and_suffix(model, CachePolicy(kvlib.load_press("none")), ids, logits_to_keep=0)
    chunked = prefill_and_suffix(model, CachePolicy(kvlib.load_press("none"), prefill_chunk=10), ids, logits_to_keep=0)
    assert chunked[0].shape == one_shot[0].shape == (2, PREFIX, model.config.vocab_size)
    assert (chunked[0] - one_shot[0]).abs().max() < 1e-4 and (chunked[1] - one_shot[1]).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_presses_that_need_the_whole_context_are_refused(name):
    with pytest.raises(ValueError, match=f"prefill_chunk is not available for the {name} press"):
        CachePolicy(press(name), prefill_chunk=16)
    with pytest.raises(ValueError, match=f"kv_budget is not available for the {name} press"):
        CachePolicy(press(name), kv_budget=32)
    CachePolicy(press(name), positions="rerotate")  # one shot, then re-rotated: nothing to refuse


# --- smaller chunks -----------------------------------------------------------------------------------------


class HeldPositions:
    """The most positions any full-attention layer held at the end of a forward (before the press prunes)."""

    def __init__(self, model):
        self.most = 0
        self.hook = model.register_forward_hook(self.record, with_kwargs=True)

    def record(self, _module, _args, kwargs, _output):
        cache = kwargs["cache"]
        held = [layer.keys.shape[-2] for layer in cache.layers if not is_sliding(layer) and layer.is_initialized]
        self.most = max(self.most, *held)


@pytest.mark.parametrize("name", CHUNKABLE)
@pytest.mark.parametrize("chunk, kv_budget", [(16, None), (20, None), (16, 20)])
def test_small_chunks_stay_within_budget_plus_chunk(model, name, chunk, kv_budget):
    ids = token_ids()
    pressed = press(name)
    if kv_budget is not None and name == "pyramidkv":
        pytest.skip("pyramidkv sets its own per-layer budgets (refused with kv_budget, tested below)")
    held = HeldPositions(model)
    try:
        _, suffix, cache = prefill_and_suffix(
            model, CachePolicy(pressed, prefill_chunk=chunk, kv_budget=kv_budget), ids
        )
    finally:
        held.hook.remove()
    assert torch.isfinite(suffix).all()
    budgets = {}
    for layer_idx in full_attention_layers(model):
        layer = pressed.last_report.kept_indices[layer_idx]
        budgets[layer_idx] = kv_budget or pressed.budget(PREFIX, _layer_stub(model, layer_idx))
        assert layer.shape[-1] == budgets[layer_idx]
        assert cache.layers[layer_idx].keys.shape[-2] == budgets[layer_idx] + SUFFIX
        assert torch.all(layer[..., 1:] > layer[..., :-1]) and layer.min() >= 0 and layer.max() < PREFIX
    assert held.most <= max(budgets.values()) + chunk
    assert held.most > max(budgets.values()), "the press pruned at least once before the last chunk"


def _layer_stub(model, layer_idx):
    empty = torch.empty(0)
    return kvlib.PrefillLayer(layer_idx, model.config.num_hidden_layers, empty, empty, empty, 1.0)


@torch.no_grad()
def masked_full_pass(model, ids, visible_from_prefix, per_head=None):
    """One full pass over `ids`; in full-attention layers query t sees only `visible_from_prefix(t)` (a bool row
    over all positions, the same for every layer and head) or `per_head[layer]` ([batch, kv_heads, t, key]);
    every layer keeps its own causal (or sliding-window) mask besides."""
    batch, length = ids.shape
    q_heads = model.config.num_attention_heads
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    hooks = []
    for module in model.modules():
        if not (type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")):
            continue
        window = getattr(module, "sliding_window", None)
        allowed = (key <= query).expand(batch, 1, length, length)
        if window is not None:
            allowed = allowed & (key > query - window)
        elif per_head is not None:
            rows = per_head[module.layer_idx]
            allowed = allowed & rows.repeat_interleave(q_heads // rows.shape[1], dim=1)
        else:
            allowed = allowed & torch.stack([visible_from_prefix(t) for t in range(length)])
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def replace_mask(_module, args, kwargs, additive=additive):
            return args, {**kwargs, "attention_mask": additive}

        hooks.append(module.register_forward_pre_hook(replace_mask, with_kwargs=True))
    try:
        return model(ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("chunk, kv_budget", [(16, 24), (20, 24), (10, 12)])
def test_chunked_streaming_llm_equals_a_full_pass_masked_chunk_by_chunk(model, chunk, kv_budget):
    """StreamingLLM keeps its sinks and the most recent positions: after each chunk ending at s, the cache holds
    positions 0-3 and s - (budget - 4) .. s - 1, so the chunked prefill is a full pass with that mask."""
    ids = token_ids(length=PREFIX + SUFFIX)
    pressed = kvlib.load_press("streaming_llm", compression_ratio=0.0, n_sink=4)
    policy = CachePolicy(pressed, prefill_chunk=chunk, kv_budget=kv_budget)
    logits, suffix, _ = prefill_and_suffix(model, policy, ids, logits_to_keep=0)
    bounds = chunk_bounds(PREFIX, chunk)
    starts = torch.tensor([start for start, _ in bounds])

    def kept_before(start: int) -> torch.Tensor:
        position = torch.arange(ids.shape[1])
        if start <= kv_budget:
            return position < start
        return (position < 4) | ((position >= start - (kv_budget - 4)) & (position < start))

    def visible(t: int) -> torch.Tensor:
        start = PREFIX if t >= PREFIX else int(starts[starts <= t].max())
        return kept_before(start) | (torch.arange(ids.shape[1]) >= start)

    oracle = masked_full_pass(model, ids, visible)
    assert (logits - oracle[:, :PREFIX]).abs().max() < 1e-4
    assert (suffix - oracle[:, PREFIX:]).abs().max() < 1e-4
    expected = torch.cat((torch.arange(4), torch.arange(PREFIX - (kv_budget - 4), PREFIX)))
    for kept in pressed.last_report.kept_indices.values():
        assert torch.equal(kept, expected.expand_as(kept))


@pytest.mark.parametrize("name, chunk", [("snapkv", 16), ("snapkv", 15), ("expected_attention", 9), ("tova", 1)])
def test_a_short_last_chunk_borrows_what_the_press_reads(name, chunk):
    """65 tokens in chunks of 16 leave one token; the last chunk takes the window it needs from the one before."""
    model, ids = tiny_model("phi3"), token_ids(length=PREFIX + 1)
    pressed = press(name)
    logits, cache = CachePolicy(pressed, prefill_chunk=chunk).prefill(model, ids)
    assert torch.isfinite(logits).all()
    budget = pressed.budget(PREFIX + 1, _layer_stub(model, 0))
    assert all(kept.shape[-1] == budget for kept in pressed.last_report.kept_indices.values())
    assert all(layer.keys.shape[-2] == budget for layer in cache.layers)


def test_each_chunks_logits_can_be_handed_over_instead_of_kept():
    model, ids = tiny_model("qwen2"), token_ids()[:, :PREFIX]
    all_logits, _ = chunked_prefill(model, ids, press("tova"), 20, logits_to_keep=0)
    seen = []
    none, _ = chunked_prefill(model, ids, press("tova"), 20, on_chunk=lambda *chunk: seen.append(chunk))
    assert none is None and [(start, end) for start, end, *_ in seen] == chunk_bounds(PREFIX, 20)
    assert torch.equal(torch.cat([logits for _, _, logits, _ in seen], dim=1), all_logits)


@pytest.mark.parametrize("name", CHUNKABLE)
def test_chunked_prefill_equals_a_full_pass_masked_as_each_chunk_saw_the_cache(model, name, monkeypatch):
    """Any press, chunks of 20 (the last one borrowing a window where the press reads one): each chunk's queries
    see, per layer and KV head, what the press kept after the previous chunk plus their own chunk; the suffix sees
    the final kept positions. Also covers layers of different lengths (pyramidkv) and per-head choices."""
    ids = token_ids()
    pressed = press(name)
    pruned_per_chunk = []
    original_pruned = base._pruned

    def recording(cache, kept, prefix_length):
        pruned_per_chunk.append(dict(kept))
        return original_pruned(cache, kept, prefix_length)

    monkeypatch.setattr(base, "_pruned", recording)
    logits, suffix, cache = prefill_and_suffix(model, CachePolicy(pressed, prefill_chunk=20), ids, logits_to_keep=0)
    bounds = chunk_bounds(PREFIX, 20, pressed.chunk_tokens())
    assert len(pruned_per_chunk) == len(bounds)

    batch, length = ids.shape
    visible = {}  # full layer -> [batch, kv_heads, length, length]: which keys each query may see
    for layer_idx in full_attention_layers(model):
        kv_heads = cache.layers[layer_idx].keys.shape[1]
        held = torch.zeros(batch, kv_heads, 0, dtype=torch.long)
        rows = torch.zeros(batch, kv_heads, length, length, dtype=torch.bool)
        for (start, end), pruned in zip([*bounds, (PREFIX, length)], [*pruned_per_chunk, {}], strict=True):
            seen_before = torch.zeros(batch, kv_heads, length, dtype=torch.bool).scatter_(2, held, True)
            rows[:, :, start:end] = seen_before[:, :, None] | (torch.arange(length) >= start)
            held = torch.cat((held, torch.arange(start, end).expand(batch, kv_heads, -1)), dim=-1)
            if layer_idx in pruned:
                held = held.gather(-1, pruned[layer_idx])
        assert torch.equal(held[..., : held.shape[-1] - SUFFIX], pressed.last_report.kept_indices[layer_idx])
        visible[layer_idx] = rows

    oracle = masked_full_pass(model, ids, None, visible)
    assert (logits - oracle[:, :PREFIX]).abs().max() < 1e-4, name
    assert (suffix - oracle[:, PREFIX:]).abs().max() < 1e-4, name


def test_chunked_prefill_composes_with_quantized_storage():
    """Pruned in float after every chunk, quantized once at the end: the same kept positions as float storage."""
    model, ids = tiny_model("llama"), token_ids()
    pressed = press("snapkv")
    float_suffix = prefill_and_suffix(model, CachePolicy(pressed, prefill_chunk=16), ids)[1]
    float_kept = pressed.last_report.kept_indices
    quantized = CachePolicy(pressed, Storage.parse("hqq-int8", {"q_group_size": 16}), prefill_chunk=16)
    suffix, _ = prefill_and_suffix(model, quantized, ids)[1:]
    assert all(torch.equal(pressed.last_report.kept_indices[layer], float_kept[layer]) for layer in float_kept)
    assert torch.isfinite(suffix).all() and 0 < (suffix - float_suffix).abs().max() < 1


def test_chunk_bounds_give_the_last_chunk_a_whole_window():
    assert chunk_bounds(64, 16) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert chunk_bounds(64, 20, min_last=8) == [(0, 20), (20, 40), (40, 56), (56, 64)]
    assert chunk_bounds(10, 64, min_last=8) == [(0, 10)]
    assert min_chunk(press("snapkv")) == 15 and min_chunk(press("tova")) == 1 and min_chunk(press("knorm")) == 1


# --- re-rotation ----------------------------------------------------------------------------------------------


class PreRotationKeys:
    """The keys each attention layer handed to its model's `apply_rotary_pos_emb` (before rotation), per call."""

    def __init__(self, model, monkeypatch):
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.layer = None
        attention = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
        module = sys.modules[type(attention[0]).__module__]
        original = module.apply_rotary_pos_emb

        def recording(q, k, cos, sin, *args, **kwargs):
            self.keys.setdefault(self.layer, []).append(k.detach().clone())
            return original(q, k, cos, sin, *args, **kwargs)

        monkeypatch.setattr(module, "apply_rotary_pos_emb", recording)
        self.apply = original
        self.hooks = [m.register_forward_pre_hook(self.enter) for m in attention]

    def enter(self, module, _args):
        self.layer = module.layer_idx

    def all(self, layer_idx: int) -> torch.Tensor:
        return torch.cat(self.keys[layer_idx], dim=-2)


@torch.no_grad()
def model_tables(model, length: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The (cos, sin) each attention layer receives from the model itself for positions 0 .. length - 1."""
    tables, hooks = {}, []
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):

            def grab(module, _args, kwargs):
                tables[module.layer_idx] = kwargs["position_embeddings"]

            hooks.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        model(torch.zeros(1, length, dtype=torch.long), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return tables


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("name", ["knorm", "streaming_llm", "pyramidkv"])
def test_rerotated_keys_are_the_models_own_keys_at_their_new_positions(model, name, chunk, monkeypatch):
    ids = token_ids()
    pressed = press(name)
    recorder = PreRotationKeys(model, monkeypatch)
    try:
        with torch.no_grad():
            _, cache = CachePolicy(pressed, prefill_chunk=chunk, positions="rerotate").prefill(model, ids[:, :PREFIX])
    finally:
        for hook in recorder.hooks:
            hook.remove()
    plain_keys = {layer_idx: recorder.all(layer_idx) for layer_idx in range(len(cache.layers))}
    kept = pressed.last_report.kept_indices
    next_position = max(kept[layer].shape[-1] for layer in kept)
    assert CachePolicy(pressed, positions="rerotate").next_position(cache, PREFIX) == next_position
    tables = model_tables(model, next_position)
    for layer_idx, layer in enumerate(cache.layers):
        plain = plain_keys[layer_idx]  # [batch, kv_heads, PREFIX, dim], in token order
        if is_sliding(layer):  # the window shifts with the full layers: its last key sits at next_position - 1
            held = layer.keys.shape[-2]
            plain, first = plain[:, :, PREFIX - held :], next_position - held
        else:
            index = kept[layer_idx]
            plain = plain.gather(2, index[..., None].expand(-1, -1, -1, plain.shape[-1]))
            held, first = index.shape[-1], next_position - index.shape[-1]
        cos, sin = (table[:, first : first + held] for table in tables[layer_idx])
        _, expected = recorder.apply(plain, plain, cos, sin)
        torch.testing.assert_close(layer.keys, expected, rtol=1e-5, atol=1e-5)
    suffix = extend(model, ids[:, PREFIX:], cache, next_position)
    assert torch.isfinite(suffix).all()


def test_rerotation_changes_keys_and_logits():
    """The oracle above must be able to fail: original positions give other keys and other suffix logits."""
    model, ids = tiny_model("llama"), token_ids()
    original = prefill_and_suffix(model, CachePolicy(press("knorm"), prefill_chunk=16), ids)
    rerotated = prefill_and_suffix(model, CachePolicy(press("knorm"), prefill_chunk=16, positions="rerotate"), ids)
    assert not torch.allclose(original[2].layers[0].keys, rerotated[2].layers[0].keys, atol=1e-3)
    assert (original[1] - rerotated[1]).abs().max() > 1e-3


def test_rerotate_without_rotary_positions_is_refused():
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=128)
    with pytest.raises(ValueError, match="positions='rerotate' needs rotary position embeddings; GPT2Config"):
        check_policy(press("knorm"), positions="rerotate", model_config=config)
    check_policy(press("knorm"), positions="rerotate", model_config=tiny_model("gpt_neox").config)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has none"):
        rotary_module(GPT2LMHeadModel(config))


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prefill_chunk": 0}, "prefill_chunk must be a positive number of tokens.*got 0"),
        ({"prefill_chunk": -4}, "prefill_chunk must be a positive number of tokens.*got -4"),
        ({"prefill_chunk": True}, "prefill_chunk must be a positive number of tokens.*got True"),
        ({"kv_budget": 0}, "kv_budget must be a positive number of positions per layer; got 0"),
        ({"kv_budget": 100, "context_length": 64}, "kv_budget 100 is larger than the context of 64 tokens"),
        ({"positions": "shifted"}, "positions must be one of original, rerotate; got 'shifted'"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(settings, message):
    with pytest.raises(ValueError, match=message):
        check_policy(press("knorm"), **settings)


def test_press_specific_refusals():
    with pytest.raises(ValueError, match="kv_budget 2 is below the 4 positions the streaming_llm press always keeps"):
        CachePolicy(press("streaming_llm"), kv_budget=2)
    with pytest.raises(ValueError, match="kv_budget 4 is below the 8 positions the snapkv press always keeps"):
        CachePolicy(press("snapkv"), kv_budget=4)
    with pytest.raises(ValueError, match="prefill_chunk 8 is too short for the snapkv press.*>= 15"):
        CachePolicy(press("snapkv"), prefill_chunk=8)
    with pytest.raises(ValueError, match="pyramidkv sets its own per-layer budgets"):
        CachePolicy(press("pyramidkv"), kv_budget=32)
    with pytest.raises(ValueError, match="the 'none' press keeps all"):
        CachePolicy(kvlib.load_press("none"), kv_budget=32)


def test_policy_identity_and_sharing():
    assert CachePolicy(press("knorm")).identity() == {} and CachePolicy(press("knorm")).shareable
    policy = CachePolicy(press("knorm"), prefill_chunk=16, kv_budget=32, positions="rerotate")
    assert policy.identity() == {"prefill_chunk": 16, "kv_budget": 32, "positions": "rerotate"}
    assert not policy.shareable
    shared = kvlib.SharedPrefill.run(tiny_model("llama"), token_ids()[:, :PREFIX], [policy.press])
    with pytest.raises(ValueError, match="needs its own prefill"):
        policy.from_shared(shared)
