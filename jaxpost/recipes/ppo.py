"""PPO for RLHF (stage 3), start to finish (readable in one sitting).

    jaxpost train --gin_file=configs/algorithms/ppo.gin --gin_file=my_experiment.gin

Per rollout: sample completions of a prompt batch from the policy, score
them (reward model or reward functions), measure old log-probs, reference
log-probs and values with training forwards, turn the KL-penalised score
into per-token rewards, GAE advantages (whitened) and returns, then
``ppo_epochs`` passes of shuffled minibatch updates of policy and value
together: one :class:`TrainState` with ``params = {"policy", "value"}``
and loss ``policy_loss + vf_coef * value_loss``. The KL coefficient is
fixed (``kl_target=None``) or adapted (Ziegler et al. 2019).
"""

from __future__ import annotations

import functools
import time

import gin
import jax
import jax.numpy as jnp

from jaxpost import models
from jaxpost.algorithms import LM_KEYS
from jaxpost.algorithms.online import make_ppo_loss, ppo_advantages
from jaxpost.config import build, build_if_bound
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.generate.rollout import Roller, RolloutConfig
from jaxpost.generate.scorers import make_scorer
from jaxpost.losses.ppo import AdaptiveKLController
from jaxpost.models.config import ModelConfig
from jaxpost.models.export import export
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner
from jaxpost.train.online import (OnlineConfig, OnlineTrainer, check_single_process, minibatch_orders, reference_policy,
                                  rollout_rng)
from jaxpost.train.run_dir import prepare_run_dir, write_operative_config, write_summary


@gin.configurable
def ppo(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
        model: ModelConfig | None = None, init_from: str | None = None, value_from: str | None = None,
        rollout: RolloutConfig | None = None, online: OnlineConfig | None = None, ppo_epochs: int = 4,
        minibatch_size: int | None = None, kl_coef: float = 0.05, kl_target: float | None = None,
        kl_horizon: float = 10000.0, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
        whiten_rewards: bool = False) -> dict:
    """Trains a policy and a value model with PPO against the gin-configured scorer.

    The policy starts from ``init_from`` (an SFT export) or a fresh
    ``model``; the reference is a frozen copy of it (under LoRA, its base
    with adapters off). The value model starts
    from ``value_from`` (usually the reward model) or the policy's body,
    with a ``score`` head. Exports ``run_dir/final`` (policy) and
    ``run_dir/value``. Summary: the last rollout's metrics.
    ``rollout`` (default: ``RolloutConfig()``), ``online`` (``OnlineConfig()``) and ``model``
    (``ModelConfig()`` where gin binds any of its fields) are built at call time with gin's bindings.
    """
    # Built here, at call time, so that bindings of RolloutConfig/OnlineConfig/ModelConfig apply without
    # `ppo.rollout = @RolloutConfig()`; the run's own defaults yield to gin's bindings.
    rollout, online = build(RolloutConfig, rollout), build(OnlineConfig, online)
    model = build_if_bound(ModelConfig, model)
    check_single_process("PPO")
    tok, rows = check_run_inputs("ppo", train_data=train_data, kind="prompt", tokenizer=tokenizer,
                                 init_from=init_from, model=model)
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, policy = load_model(model, init_from, part, seed=online.seed)
    v_config, v_graphdef, value = load_model(model, value_from or init_from, part, seed=online.seed, head="score")
    reference = reference_policy(policy)
    params = {"policy": policy, "value": value}
    shardings = {"policy": part.shardings(models.logical_axes(config), policy),
                 "value": part.shardings(models.logical_axes(v_config), value)}

    rows_per_rollout = online.prompts_per_rollout * rollout.group_size
    minibatch_size = minibatch_size or rows_per_rollout
    updates = online.num_rollouts * ppo_epochs * (rows_per_rollout // minibatch_size)
    trainer = OnlineTrainer(run, make_ppo_loss(graphdef, config, v_graphdef), params, shardings, part, online,
                            total_updates=updates)
    roller = Roller(graphdef, config, tok, part, make_scorer(part, policy_vocab_size=config.vocab_size), rollout,
                    value_graphdef=v_graphdef)
    prompts = make_prompt_pipeline(rows, tok, online.max_prompt_len, online.prompts_per_rollout,
                                   online.seed, num_epochs=None)
    advantages = jax.jit(functools.partial(ppo_advantages, kl_estimator=kl_estimator, gamma=gamma, lam=lam,
                                           whiten_rewards=whiten_rewards))
    kl_control = AdaptiveKLController(kl_target, kl_horizon)
    extras = trainer.restore(prompts) or {"rollout": 0, "kl_coef": kl_coef}
    record: dict = {}
    try:
        with part.activate():
            for i in range(extras["rollout"], online.num_rollouts):
                start = time.perf_counter()
                p = trainer.state.params
                r = roller(p["policy"], reference(p["policy"]), p["value"], next(prompts), rollout_rng(online.seed, i))
                coef = extras["kl_coef"]
                adv, ret, obj = advantages(r.batch["old_logp"], r.batch["ref_logp"], r.batch["old_values"],
                                           jnp.asarray(r.scores), r.batch["loss_mask"], jnp.float32(coef))
                batch = {k: r.batch[k] for k in (*LM_KEYS, "old_logp", "old_values")}
                batch.update(advantages=adv, returns=ret)
                train = trainer.update(batch, minibatch_orders(rows_per_rollout, minibatch_size, ppo_epochs,
                                                               online.seed, i))
                obj = {k: float(v) for k, v in jax.device_get(obj).items()}
                extras = {"rollout": i + 1,
                          "kl_coef": float(kl_control.update(coef, obj["objective/kl"], rows_per_rollout))}
                seconds = time.perf_counter() - start
                record = {**r.metrics, **obj, **train, "objective/kl_coef": coef,
                          "time/rollout_s": seconds, "time/generate_fraction": r.metrics["time/generate_s"] / seconds}
                trainer.log(i + 1, record)
                trainer.save(i + 1, prompts, extras)
    finally:
        trainer.close()
    write_operative_config(run, config)
    summary = {"rollout": extras["rollout"], "step": int(trainer.state.step), **record}
    card = dict(data={"prompts": train_data}, summary=summary)
    export(run, config, trainer.state.params["policy"], tok, method="ppo", init_from=init_from, **card)
    export(run, v_config, trainer.state.params["value"], tok, name="value", method="ppo",
           init_from=value_from or init_from, **card)
    write_summary(run, summary)
    return summary
