"""Tiny random Hugging Face PyTorch models for parity tests (no hub access)."""

import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)

CASES = {
    # name: (config class, model class suffix, extra config)
    "llama_gqa_untied": ("LlamaConfig", "Llama", dict(tie_word_embeddings=False)),
    "llama31_rope_tied": ("LlamaConfig", "Llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral_window": ("MistralConfig", "Mistral", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2", dict(tie_word_embeddings=True)),
    "qwen3_qknorm_headdim": ("Qwen3Config", "Qwen3", dict(head_dim=24, tie_word_embeddings=False)),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, norms and biases included (HF inits norms to 1, biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def make_model(case: str, head: str = "lm", seed: int = 0):
    cfg_cls, prefix, extra = CASES[case]
    kwargs = {**BASE, **extra}
    if head == "score":
        kwargs.update(num_labels=1, pad_token_id=0)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    cls = getattr(transformers, prefix + ("ForCausalLM" if head == "lm" else "ForSequenceClassification"))
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    randomize(model, seed)
    if head == "lm" and cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model
