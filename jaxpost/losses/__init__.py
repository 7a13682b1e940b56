"""Pure loss math for post-training: arrays in, ``(loss, metrics)`` out.

Each function works on per-token or per-sequence log-probs, rewards, values
and masks (the chunked distillation losses also take hidden states and head
weights, never a model), is jit-compatible, computes in float32, and states
its formula and reference in its docstring.
"""

from jaxpost.losses.distill import (DIVERGENCES, chunked_distill_loss, chunked_topk_distill_loss, forward_kl,
                                    generalized_jsd, masked_divergence, reverse_kl, teacher_topk, topk_forward_kl)
from jaxpost.losses.dpo import (PREFERENCE_LOSSES, combined_preference_loss, hinge_loss, ipo_loss, orpo_loss,
                                preference_loss, robust_loss, sigmoid_loss, simpo_loss)
from jaxpost.losses.dpo_relatives import (aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss, bco_pair_loss,
                                          chosen_nll_loss, discopop_loss, exo_pair_loss, nca_pair_loss,
                                          sigmoid_norm_loss, sppo_hard_loss)
from jaxpost.losses.grpo import (advantages_of, gdpo_advantages, group_advantages, grpo_loss, high_entropy_mask,
                                 off_policy_sequence_mask, rloo_advantages, vespo_weights)
from jaxpost.losses.ppo import (AdaptiveKLController, adaptive_kl_coef, gae, kl_estimate, ppo_policy_loss,
                                ppo_token_rewards, ppo_value_loss)
from jaxpost.losses.preference_math import F_DIVERGENCES, divergence_scores
from jaxpost.losses.reward import bradley_terry_loss, gather_last, last_token_index, segment_last_token_indices
from jaxpost.losses.sequence import (average_logps, ld_sequence_logps, mean_sequence_logps, packed_sequence_logps,
                                     packed_wpo_weights, pair_last_index, pair_sums, sequence_logps, wpo_weights)
from jaxpost.losses.sft import masked_token_nll, sft_loss, token_accuracy
from jaxpost.losses.stats import entropy_from_logits, masked_mean, masked_sum, masked_var, whiten

__all__ = [
    "DIVERGENCES", "PREFERENCE_LOSSES", "AdaptiveKLController", "adaptive_kl_coef", "advantages_of", "bradley_terry_loss",
    "chunked_distill_loss", "entropy_from_logits", "forward_kl", "gae", "gather_last", "gdpo_advantages",
    "generalized_jsd", "group_advantages", "grpo_loss", "high_entropy_mask", "hinge_loss", "ipo_loss", "kl_estimate",
    "last_token_index", "masked_mean", "masked_sum", "masked_token_nll", "masked_var", "off_policy_sequence_mask",
    "orpo_loss", "ppo_policy_loss", "ppo_token_rewards", "ppo_value_loss", "preference_loss", "reverse_kl",
    "rloo_advantages", "robust_loss", "segment_last_token_indices", "sft_loss", "sigmoid_loss", "simpo_loss",
    "token_accuracy", "topk_forward_kl", "whiten",
]
__all__ += ["average_logps", "chunked_topk_distill_loss", "masked_divergence", "mean_sequence_logps",
            "packed_sequence_logps", "pair_last_index", "pair_sums", "sequence_logps", "teacher_topk"]
__all__ += ["F_DIVERGENCES", "aot_loss", "aot_unpaired_loss", "apo_down_loss", "apo_zero_loss", "bco_pair_loss",
            "chosen_nll_loss", "combined_preference_loss", "discopop_loss", "divergence_scores", "exo_pair_loss",
            "nca_pair_loss", "sigmoid_norm_loss", "sppo_hard_loss", "vespo_weights", "ld_sequence_logps"]
__all__ += ["packed_wpo_weights", "wpo_weights"]
