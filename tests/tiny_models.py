"""Tiny randomly initialised causal LMs, one per architecture family kvlib supports."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, max_position_embeddings=512)

CONFIGS = {
    # Pythia's family: fused QKV, rotary on a quarter of each head.
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON, num_attention_heads=4, rotary_pct=0.25),
    "llama": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    "phi3": lambda: Phi3Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    # Hybrid attention: sliding layers (window 16, shorter than the test prefixes) around one full layer.
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    # Random init leaves some norms at exactly one and biases at zero; perturb so every parameter matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()
