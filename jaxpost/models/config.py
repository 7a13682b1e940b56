"""Model configuration: one frozen dataclass covers the Llama family.

Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (``qkv_bias``) and Qwen3 (``qk_norm``)
differ only in the fields below. Presets live in ``configs/models/*.gin``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``head`` selects the output head: ``"lm"`` (next-token logits over the
    vocabulary) or ``"score"`` (a scalar per position, for reward and value
    models; Hugging Face's ``*ForSequenceClassification`` with one label).
    ``dtype`` is the compute dtype; ``param_dtype`` the stored (master) one.
    ``remat`` is the rematerialisation policy per layer: ``"none"``,
    ``"full"`` or ``"save_dots"``. ``architecture`` names the Hugging Face
    family used on export (``llama``, ``mistral``, ``qwen2``, ``qwen3``).
    ``sliding_window`` (Mistral v0.1): a query attends only to the last
    ``sliding_window`` slots, itself included.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    head: str = "lm"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    architecture: str = "llama"
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.remat not in ("none", "full", "save_dots"):
            raise ValueError(f"remat must be 'none', 'full' or 'save_dots', got {self.remat!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "set head_dim explicitly")
        if self.dim_per_head % 2:
            raise ValueError(f"head dimension {self.dim_per_head} must be even for rotary embeddings")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the config alone (used for FLOPs/MFU)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        per_layer = attn + 3 * d * f + 2 * d
        n = self.num_layers * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d
            if self.head == "lm" and not self.tie_embeddings:
                n += self.vocab_size * d
        if self.head == "score":
            n += d
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward).

        6 * N_matmul + 12 * layers * heads * head_dim * seq_len, the standard
        dense-transformer estimate (PaLM appendix B), where N_matmul counts the
        weights that take part in matmuls (the LM head but not the embedding
        lookup).
        """
        n = self.num_params(include_embeddings=False)
        if self.head == "lm":
            n += self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_heads * self.dim_per_head * seq_len
        return 6.0 * n + attn
