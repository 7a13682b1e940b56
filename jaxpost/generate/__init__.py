"""The one KV-cache sampler, logit processing, reward functions, and prompt-file generation."""

from jaxpost.generate.generate_file import generate_to_jsonl, read_prompts
from jaxpost.generate.processing import (choose_tokens, min_p_filter, penalize_repetitions, process_logits,
                                         top_k_filter, top_p_filter)
from jaxpost.generate.rewards import REWARDS, get_reward, make_reward, register_reward
from jaxpost.generate.sampler import (SampleOutput, Sampler, SamplingConfig, bucket_length, check_prompts,
                                      left_pad, sample)

__all__ = [
    "REWARDS", "SampleOutput", "Sampler", "SamplingConfig", "bucket_length", "check_prompts", "choose_tokens",
    "generate_to_jsonl", "get_reward", "left_pad", "make_reward", "process_logits", "read_prompts",
    "min_p_filter", "penalize_repetitions", "register_reward", "sample", "top_k_filter", "top_p_filter",
]
