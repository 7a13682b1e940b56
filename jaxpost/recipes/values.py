"""The recipes' own sizes and coefficients, checked on the bindings before a run loads anything.

``jaxpost train`` runs these checks (:func:`jaxpost.config.check_bound_values`)
right after parsing, so ``--gin.grpo.num_iterations=0`` or
``--gin.ppo.lam=1.5`` is one line naming the key, in seconds, not an error
from deep inside the run once the model has loaded. Each recipe runs them
again on its arguments (:func:`jaxpost.config.check_values`), so a caller
of ``jaxpost.recipes.grpo(...)`` gets the same errors. A recipe's own rules
that need more than its bindings (``grpo.advantage`` against the group
size) stay in the recipe.
"""

from __future__ import annotations

import functools

from jaxpost.config import checks_values_of
from jaxpost.errors import require
from jaxpost.losses.distill import DIVERGENCES
from jaxpost.losses.ppo import KL_ESTIMATORS

__all__ = ["check_run_sizes", "check_ppo_values", "check_distill_values", "check_continual_values"]

RECIPES = ("sft", "dpo", "kto", "reward_model", "distill", "grpo", "ppo", "online_dpo", "continual", "synthesize")


def check_run_sizes(task: str, batch_size: int | None = None, seq_len: int | None = None,
                    minibatch_size: int | None = None, max_prompt_len: int | None = None,
                    eval_fraction: float | None = None, num_iterations: int | None = None,
                    ppo_epochs: int | None = None, updates_per_round: int | None = None) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming ``<task>.<key>`` for a size the run cannot use.

    Each is checked where the recipe has it (None: it has not): sizes and
    passes over a rollout ``>= 1``, ``1 <= max_prompt_len <= seq_len - 2``,
    ``0 < eval_fraction < 1``.
    """
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("minibatch_size", minibatch_size),
                       ("num_iterations", num_iterations), ("ppo_epochs", ppo_epochs),
                       ("updates_per_round", updates_per_round)):
        require(f"{task}.{key}", value, value is None or (isinstance(value, int) and value >= 1),
                "an int >= 1" + (" (None: all of a rollout's rows)" if key == "minibatch_size" else ""))
    if max_prompt_len is not None:  # the rest of a row must hold at least a reply token and its end
        limit = seq_len - 2 if seq_len is not None else float("inf")
        require(f"{task}.max_prompt_len", max_prompt_len, 1 <= max_prompt_len <= limit,
                f"in [1, {task}.seq_len - 2 = {limit}]" if seq_len is not None else ">= 1")
    require(f"{task}.eval_fraction", eval_fraction, eval_fraction is None or 0 < eval_fraction < 1,
            "None or in (0, 1)")


for _task in RECIPES:
    checks_values_of(_task)(functools.partial(check_run_sizes, _task))


@checks_values_of("ppo")
def check_ppo_values(kl_coef: float = 0.05, kl_target: float | None = None, kl_horizon: float = 10000.0,
                     kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``ppo`` key of a coefficient out of its range."""
    require("ppo.kl_estimator", kl_estimator, kl_estimator in KL_ESTIMATORS,
            "one of " + ", ".join(map(repr, KL_ESTIMATORS)))
    require("ppo.kl_coef", kl_coef, kl_coef >= 0, ">= 0")
    require("ppo.kl_target", kl_target, kl_target is None or kl_target > 0, "None (a fixed kl_coef) or > 0")
    require("ppo.kl_horizon", kl_horizon, kl_horizon > 0, "> 0")
    require("ppo.gamma", gamma, 0 <= gamma <= 1, "in [0, 1]")
    require("ppo.lam", lam, 0 <= lam <= 1, "in [0, 1]")


@checks_values_of("distill")
def check_distill_values(divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0,
                         beta: float = 0.5, lmbda: float = 0.5, top_k: int = 0, teacher_samples_per_prompt: int = 1,
                         teacher_batch_size: int = 8, chunk_size: int = 128) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``distill`` key of a value out of its range.

    (Combinations of ``mode`` with the other keys are the recipe's own checks.)
    """
    require("distill.divergence", divergence, divergence in DIVERGENCES, "one of " + ", ".join(map(repr, DIVERGENCES)))
    require("distill.temperature", temperature, temperature > 0, "> 0")
    require("distill.alpha", alpha, 0 <= alpha <= 1, "in [0, 1] (the weight of the distillation term)")
    require("distill.beta", beta, 0 <= beta <= 1, "in [0, 1] (jsd's mixture weight)")
    require("distill.lmbda", lmbda, 0 <= lmbda <= 1, "in [0, 1] (the fraction of on-policy steps)")
    require("distill.top_k", top_k, top_k >= 0, ">= 0 (0: the whole vocabulary)")
    if top_k:
        require("distill.divergence", divergence, divergence == "forward_kl",
                f"'forward_kl' with distill.top_k={top_k} (a top-k teacher supports only forward KL)")
    for key, value in (("teacher_samples_per_prompt", teacher_samples_per_prompt),
                       ("teacher_batch_size", teacher_batch_size), ("chunk_size", chunk_size)):
        require(f"distill.{key}", value, value >= 1, ">= 1")


@checks_values_of("continual")
def check_continual_values(min_records: int = 64, max_rounds: int | None = None, poll_seconds: float = 30.0) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``continual`` key of a value out of its range.

    (``tolerance`` may be negative: a round must then improve by at least that much.)
    """
    require("continual.min_records", min_records, min_records >= 1, ">= 1")
    require("continual.max_rounds", max_rounds, max_rounds is None or max_rounds >= 1, "None (no limit) or >= 1")
    require("continual.poll_seconds", poll_seconds, poll_seconds > 0, "> 0")

