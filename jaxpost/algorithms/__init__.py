"""Algorithms: a pure ``loss(params, batch, frozen)`` plus the batch spec it reads.

Each ``make_*_loss(graphdef, config, ...)`` closes over the model structure
(static) and returns a function of arrays only, ready for
:func:`jaxpost.train.make_train_step`. The math lives in
:mod:`jaxpost.losses`; these functions run the model and feed it.
"""

from jaxpost.algorithms.distill import (make_cached_distill_loss, make_distill_loss,
                                       make_teacher_topk_fn)
from jaxpost.algorithms.batch import (BATCH_SPECS, CACHED_KEYS, GRPO_KEYS, LM_KEYS, PACKED_PREFERENCE_KEYS, PPO_KEYS,
                                     PREFERENCE_KEYS, PROMPT_KEYS, ROLLOUT_KEYS, SHARED_PROMPT_KEYS, BatchSpec,
                                     check_batch)
from jaxpost.algorithms.lm import lm_token_logprobs, pair_token_logprobs, predictions
from jaxpost.algorithms.preference import make_dpo_loss, make_reward_loss, with_base_reference
from jaxpost.algorithms.sft import make_sft_eval, make_sft_loss

__all__ = ["LM_KEYS", "PACKED_PREFERENCE_KEYS", "PREFERENCE_KEYS", "SHARED_PROMPT_KEYS", "check_batch", "lm_token_logprobs",
           "pair_token_logprobs", "predictions", "make_dpo_loss", "make_reward_loss", "make_sft_eval",
           "make_sft_loss"]

__all__ += ["CACHED_KEYS", "make_cached_distill_loss", "make_distill_loss", "make_teacher_topk_fn"]
__all__ += ["BATCH_SPECS", "BatchSpec", "GRPO_KEYS", "PPO_KEYS", "PROMPT_KEYS", "ROLLOUT_KEYS", "with_base_reference"]
