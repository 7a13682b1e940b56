"""Online DPO, start to finish: DPO on fresh pairs sampled from the current policy.

    jaxpost train --gin_file=configs/algorithms/online_dpo.gin --gin_file=my_experiment.gin

Per round: ``group_size >= 2`` completions of every prompt from the current
policy, ranked by the reward model or reward functions; the best and the
worst completion of each prompt form a (chosen, rejected) pair (prompts
whose completions all score the same are skipped); then ``updates_per_round``
DPO steps (the loss ``make_dpo_loss`` is gin-configured with; reference =
the initial policy) on the fresh pairs. A minibatch without a valid pair
changes nothing (see :func:`jaxpost.train.make_train_step`).
"""

from __future__ import annotations

import gin
import numpy as np

from jaxpost import models
from jaxpost.algorithms import make_dpo_loss, with_base_reference
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.errors import UserError
from jaxpost.generate.held_out import online_evaluator
from jaxpost.generate.rollout import Roller, RolloutConfig, best_worst_pairs, pair_batch, sample_records
from jaxpost.generate.scorers import check_bound_scorer, make_scorer
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model
from jaxpost.models.lora import has_adapters
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh
from jaxpost.train.fit import finish_run
from jaxpost.train.online import (OnlineConfig, RolloutBatches, Stateless, fit_online, online_config,
                                  reference_policy)
from jaxpost.train.run_dir import prepare_run_dir


class PairRollouts(Stateless):
    """A rollout becomes one (best, worst) pair per prompt; groups that all scored alike are masked out."""

    def __init__(self, roller: Roller, reference, partitioner: Partitioner):
        self.roller, self.reference, self.partitioner = roller, reference, partitioner

    def rollout(self, params, prompts, rng, index):
        r = self.roller(params, self.reference(params), None, prompts, rng)
        chosen, rejected, valid = best_worst_pairs(r.scores, self.roller.cfg.group_size)
        gap = float((r.scores[chosen] - r.scores[rejected])[valid].mean()) if valid.any() else 0.0
        rows = on_mesh(pair_batch(r.host, chosen, rejected, valid), self.partitioner)
        role = np.full(len(r.completions), "", object)  # what each completion became in its group's pair
        role[chosen[valid]], role[rejected[valid]] = "chosen", "rejected"
        self.samples = sample_records(r, pair=role.tolist())
        return rows, {**r.metrics, "pairs/valid_fraction": float(valid.mean()), "pairs/score_gap": gap}


@gin.configurable
def online_dpo(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
               model: ModelConfig | None = None, init_from: str | None = None,
               rollout: RolloutConfig | None = None, online: OnlineConfig | None = None,
               updates_per_round: int = 1, minibatch_size: int | None = None, eval_data: str | None = None) -> dict:
    """Trains a policy with online DPO; exports ``run_dir/final``.

    ``updates_per_round`` shuffled passes over each round's pairs, in
    minibatches of ``minibatch_size`` pairs (default: all). A round with no
    valid pair makes no update (``pairs/valid_fraction`` = 0). Summary: the
    last round's metrics.
    ``eval_data``: held-out prompts, scored by greedy completions every ``OnlineConfig.eval_every`` rounds
    and at the end (``eval/score``, ``eval/rewards/<name>/mean``).
    ``rollout`` (default: ``RolloutConfig(group_size=2)``), ``online`` (``OnlineConfig()``) and ``model``
    (``ModelConfig()`` where gin binds any of its fields) are built at call time with gin's bindings.
    """
    check_values("online_dpo", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of RolloutConfig/OnlineConfig/ModelConfig apply without
    # `online_dpo.rollout = @RolloutConfig()`; the run's own defaults yield to gin's bindings.
    rollout, online = build(RolloutConfig, rollout, group_size=2), online_config(online, eval_data, "online_dpo")
    model = build_if_bound(ModelConfig, model)
    if rollout.group_size < 2:
        raise UserError(f"online DPO needs RolloutConfig.group_size >= 2, got {rollout.group_size}")
    tok, rows = check_run_inputs("online_dpo", train_data=train_data, kind="prompt", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data)
    check_bound_scorer("online_dpo")
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=online.seed)
    param_shardings = part.shardings(models.logical_axes(config), params)
    reference = reference_policy(params)
    loss_fn = make_dpo_loss(graphdef, config)
    frozen = frozen_shardings = None
    if loss_fn.needs_reference:
        if has_adapters(params):  # LoRA: the step reads the base (adapters off) from the trained params
            loss_fn = with_base_reference(loss_fn)
        else:
            frozen, frozen_shardings = {"reference": reference(params)}, {"reference": param_shardings}

    roller = Roller(graphdef, config, tok, part, make_scorer(part, policy_vocab_size=config.vocab_size), rollout)
    prompts = make_prompt_pipeline(rows, tok, online.max_prompt_len, online.prompts_per_rollout,
                                   online.seed, num_epochs=None)
    evaluate = online_evaluator(eval_data, roller, online, lambda p: p, reference)
    batches = RolloutBatches(PairRollouts(roller, reference, part), prompts, part, rows=online.prompts_per_rollout,
                             minibatch_size=minibatch_size, epochs=updates_per_round, seed=online.seed)
    summary: dict = {}
    with part.activate():
        state = fit_online(run_dir=run, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                           partitioner=part, batches=batches, online=online, frozen=frozen,
                           frozen_shardings=frozen_shardings, model_config=config, summary=summary,
                           evaluate=evaluate)
    summary["step"] = int(state.step)
    return finish_run(run, config, state, tok, summary, method="online_dpo", init_from=init_from,
                      data={"prompts": train_data, "eval": eval_data})
