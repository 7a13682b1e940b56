"""Llama-family decoder models, heads, and Hugging Face weight exchange."""

from jaxpost.models.api import abstract, create, forward, inputs_from_attention_mask, logical_axes, param_count
from jaxpost.models.attention import Branches, KVCache, attention_mask, cache_logical_axes, init_cache
from jaxpost.models.config import LoraConfig, ModelConfig, RopeScaling, model_config_gin
from jaxpost.models.heads import lm_head_weight, logits, scores, token_logprobs
from jaxpost.models.hf import hf_config_to_model_config, load_hf, model_config_to_hf_config, save_hf, weight_map
from jaxpost.models.lora import apply_lora, merge_lora
from jaxpost.models.transformer import Transformer

__all__ = [
    "Branches", "KVCache", "LoraConfig", "ModelConfig", "apply_lora", "merge_lora", "RopeScaling", "Transformer", "abstract", "attention_mask",
    "cache_logical_axes", "create", "forward", "hf_config_to_model_config", "init_cache", "inputs_from_attention_mask",
    "lm_head_weight", "load_hf", "logical_axes", "logits", "model_config_gin", "model_config_to_hf_config",
    "param_count", "save_hf", "scores", "token_logprobs", "weight_map",
]
