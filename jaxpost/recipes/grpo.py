"""GRPO, Dr. GRPO and RLOO (critic-free online RL), start to finish.

    jaxpost train --gin_file=configs/algorithms/grpo.gin --gin_file=my_experiment.gin

Per rollout: ``group_size`` completions of every prompt, scored by reward
functions (or a reward model); group-relative advantages (``grpo``:
``(r - mean_g) / (std_g + eps)``; ``dr_grpo``: ``r - mean_g``; ``grpo_batch_std``:
``(r - mean_g) / (std_batch + eps)``, TRL's ``scale_rewards='batch'``; ``rloo``:
leave-one-out ``r - mean_{j != i} r_j``; ``gdpo``: each reward term normalised
in its group, then the weighted sum over the batch); then ``num_iterations`` (mu)
passes of shuffled minibatch updates with the clipped surrogate of
:func:`jaxpost.losses.grpo_loss` (asymmetric clipping, optional k3 KL to the
reference with weight ``beta``, aggregation configured on ``make_grpo_loss``).
"""

from __future__ import annotations

import gin
import numpy as np

from jaxpost import models
from jaxpost.algorithms import LM_KEYS
from jaxpost.algorithms.online import check_grpo_advantage, make_grpo_loss
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.generate.environments import Environment
from jaxpost.generate.held_out import online_evaluator
from jaxpost.generate.multiturn import check_reward_source, make_roller
from jaxpost.generate.rollout import Roller, RolloutConfig, reward_terms, sample_records
from jaxpost.losses.grpo import advantages_of, gdpo_advantages
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh
from jaxpost.train.fit import finish_run
from jaxpost.train.online import OnlineConfig, RolloutBatches, Stateless, fit_online, online_config
from jaxpost.train.reference_sync import ReferenceSync, online_reference
from jaxpost.train.run_dir import prepare_run_dir


class GRPORollouts(Stateless):
    """A rollout becomes rows with group-relative advantages of its (global) scores."""

    def __init__(self, roller: Roller, reference, advantage: str, partitioner: Partitioner,
                 mask_truncated: bool = False, policy=lambda p: p):
        self.roller, self.reference, self.advantage, self.partitioner = roller, reference, advantage, partitioner
        self.mask_truncated, self.policy = mask_truncated, policy

    def rollout(self, params, prompts, rng, index):
        r = self.roller(self.policy(params), self.reference(params), None, prompts, rng)
        group = self.roller.cfg.group_size
        rows = {k: r.batch[k] for k in (*LM_KEYS, "old_logp", "ref_logp")}
        advantages = np.asarray(gdpo_advantages(*reward_terms(r, self.roller), group) if self.advantage == "gdpo"
                                else advantages_of(r.scores, group, self.advantage))
        rows.update(on_mesh({"advantages": advantages}, self.partitioner))
        if self.mask_truncated:  # DAPO's overlong filtering: a completion cut at its budget trains no token
            kept = on_mesh({"kept": r.finished.astype(np.float32)[:, None]}, self.partitioner)["kept"]
            rows["loss_mask"] = rows["loss_mask"] * kept
        self.samples = sample_records(r, advantage=advantages)
        spread = r.scores.reshape(-1, group).std(axis=1)
        return rows, {**r.metrics, "reward/std_within_group": float(spread.mean()),
                      "reward/zero_std_fraction": float((spread == 0).mean())}


@gin.configurable
def grpo(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
         model: ModelConfig | None = None, init_from: str | None = None, advantage: str = "grpo",
         rollout: RolloutConfig | None = None, online: OnlineConfig | None = None,
         num_iterations: int = 1, minibatch_size: int | None = None, environment: Environment | None = None,
         mask_truncated: bool = False, eval_data: str | None = None) -> dict:
    """Trains a policy with GRPO/RLOO from prompt-only data; exports ``run_dir/final``.

    ``advantage``: ``grpo``, ``dr_grpo``, ``grpo_batch_std``, ``rloo`` or ``gdpo``
    (:func:`~jaxpost.losses.grpo.gdpo_advantages`, for several rewards;
    TRL's ``multi_objective_aggregation='normalize_then_sum'``). ``mask_truncated``
    (DAPO's overlong filtering; TRL's ``mask_truncated_completions``): a
    completion that reached ``RolloutConfig.max_new_tokens`` (or an episode
    its environment cut short) without a stop token trains no token; it
    still counts in its group's advantages. ``eval_data``: held-out prompts,
    scored by greedy completions every ``OnlineConfig.eval_every`` rollouts
    and at the end (``eval/score``, ``eval/rewards/<name>/mean``). The reference (for ``beta`` and the logged
    ``objective/kl``): :func:`~jaxpost.train.reference_sync.online_reference` (a frozen copy of the initial policy,
    the base under LoRA, or with ``ReferenceSync.every`` a copy that follows the policy, TRL's ``sync_ref_model``).
    Summary: the last rollout's metrics.
    ``rollout`` (default: ``RolloutConfig(group_size=8)``), ``online`` (``OnlineConfig()``) and ``model``
    (``ModelConfig()`` where gin binds any of its fields) are built at call time with gin's bindings.
    ``environment`` (e.g. ``@CalculatorEnv()``): multi-turn episodes scored by it
    (:mod:`jaxpost.generate.multiturn`, budgets in ``MultiTurnConfig``) instead of one scored completion.
    """
    check_values("grpo", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of RolloutConfig/OnlineConfig/ModelConfig apply without
    # `grpo.rollout = @RolloutConfig()`; the run's own defaults yield to gin's bindings.
    rollout, online = build(RolloutConfig, rollout, group_size=8), online_config(online, eval_data, "grpo")
    model, sync = build_if_bound(ModelConfig, model), build(ReferenceSync)
    check_grpo_advantage(advantage, rollout.group_size, environment is not None)
    tok, rows = check_run_inputs("grpo", train_data=train_data, kind="prompt", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data)
    check_reward_source(environment, "grpo")
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=online.seed)
    param_shardings = part.shardings(models.logical_axes(config), params)

    roller = make_roller(graphdef, config, tok, part, rollout, environment, owner="grpo")
    prompts = make_prompt_pipeline(rows, tok, online.max_prompt_len, online.prompts_per_rollout,
                                   online.seed, num_epochs=None)
    loss_fn = make_grpo_loss(graphdef, config, max_len=rollout.max_new_tokens)
    ref = online_reference(sync, params, param_shardings, config, loss_fn.beta)
    method = GRPORollouts(roller, ref.reference_of, advantage, part, mask_truncated, ref.policy_of)
    evaluate = online_evaluator(eval_data, roller, online, ref.policy_of, ref.reference_of)
    batches = RolloutBatches(method, prompts, part, rows=online.prompts_per_rollout * rollout.group_size,
                             minibatch_size=minibatch_size, epochs=num_iterations, seed=online.seed)
    summary: dict = {}
    with part.activate():
        state = fit_online(run_dir=run, loss_fn=ref.loss(loss_fn), params=ref.params, param_shardings=ref.shardings,
                           partitioner=part, batches=batches, online=online, model_config=config, summary=summary,
                           evaluate=evaluate, **ref.fit_args)
    summary["step"] = int(state.step)
    return finish_run(run, config, state, tok, summary, method="grpo", init_from=init_from,
                      data={"prompts": train_data, "eval": eval_data}, params=ref.policy_of(state.params))
