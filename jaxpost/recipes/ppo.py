"""PPO for RLHF (stage 3), start to finish (readable in one sitting).

    jaxpost train --gin_file=configs/algorithms/ppo.gin --gin_file=my_experiment.gin

Per rollout: sample completions of a prompt batch from the policy, score
them (reward model or reward functions), measure old log-probs, reference
log-probs and values with training forwards, turn the KL-penalised score
into per-token rewards, GAE advantages (whitened) and returns, then
``ppo_epochs`` passes of shuffled minibatch updates of policy and value
together: one :class:`TrainState` with ``params = {"policy", "value"}``
and loss ``policy_loss + vf_coef * value_loss``. The KL coefficient is
fixed (``kl_target=None``) or adapted (Ziegler et al. 2019). ``ppo.environment``: multi-turn episodes.
"""

from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp

from jaxpost import models
from jaxpost.algorithms import LM_KEYS
from jaxpost.algorithms.online import make_ppo_loss, ppo_advantages
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.distributed import to_host
from jaxpost.generate.environments import Environment
from jaxpost.generate.held_out import online_evaluator
from jaxpost.generate.multiturn import check_reward_source, make_roller
from jaxpost.generate.rollout import Roller, RolloutConfig, sample_records
from jaxpost.losses.ppo import AdaptiveKLController
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh
from jaxpost.train.online import OnlineConfig, RolloutBatches, fit_online, online_config, reference_policy
from jaxpost.train.fit import finish_run
from jaxpost.train.run_dir import prepare_run_dir


class PPORollouts:
    """A rollout becomes rows with GAE advantages and returns; the KL coefficient adapts between rollouts."""

    def __init__(self, roller: Roller, reference, partitioner: Partitioner, advantages, kl_coef: float,
                 kl_control: AdaptiveKLController):
        self.roller, self.reference, self.partitioner, self.advantages = roller, reference, partitioner, advantages
        self.kl_coef, self.kl_control = kl_coef, kl_control

    def rollout(self, params, prompts, rng, index):
        r = self.roller(params["policy"], self.reference(params["policy"]), params["value"], prompts, rng)
        b, coef = r.batch, self.kl_coef
        scores = on_mesh({"scores": r.scores}, self.partitioner)["scores"]
        adv, ret, obj = self.advantages(b["old_logp"], b["ref_logp"], b["old_values"], scores, b["loss_mask"],
                                        jnp.float32(coef))
        obj = {k: float(v) for k, v in to_host(obj).items()}
        self.kl_coef = float(self.kl_control.update(coef, obj["objective/kl"], len(r.scores)))
        rows = {k: b[k] for k in (*LM_KEYS, "old_logp", "old_values")}
        self.samples = sample_records(r)
        return {**rows, "advantages": adv, "returns": ret}, {**r.metrics, **obj, "objective/kl_coef": coef}

    def get_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def set_state(self, state) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))


@gin.configurable
def ppo(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
        model: ModelConfig | None = None, init_from: str | None = None, value_from: str | None = None,
        rollout: RolloutConfig | None = None, online: OnlineConfig | None = None, ppo_epochs: int = 4,
        minibatch_size: int | None = None, kl_coef: float = 0.05, kl_target: float | None = None,
        kl_horizon: float = 10000.0, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
        whiten_rewards: bool = False, environment: Environment | None = None, eval_data: str | None = None) -> dict:
    """Trains a policy and a value model with PPO against the gin-configured scorer (or an ``environment``).

    The policy starts from ``init_from`` (an SFT export) or a fresh ``model``; the reference is a frozen
    copy of it (under LoRA, its base with adapters off). The value model starts from ``value_from``
    (usually the reward model) or the policy's body, with a ``score`` head. Exports ``run_dir/final`` (policy) and
    ``run_dir/value``. Summary: the last rollout's metrics. ``rollout`` (default: ``RolloutConfig()``), ``online``
    (``OnlineConfig()``) and ``model`` (``ModelConfig()`` where gin binds any of its fields) are built at call time
    with gin's bindings. ``environment``: episodes scored by it instead of the scorer; loss on the model's tokens only.
    ``eval_data``: held-out prompts, scored greedily every ``OnlineConfig.eval_every`` rollouts (``eval/score``).
    """
    check_values("ppo", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built at call time, so that bindings of RolloutConfig/OnlineConfig/ModelConfig apply (and win over defaults).
    rollout, online = build(RolloutConfig, rollout), online_config(online, eval_data, "ppo")
    model = build_if_bound(ModelConfig, model)
    tok, rows = check_run_inputs("ppo", train_data=train_data, kind="prompt", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data,
                                 other_models={"value_from": value_from})
    check_reward_source(environment, "ppo")
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, policy = load_model(model, init_from, part, seed=online.seed)
    v_config, v_graphdef, value = load_model(model, value_from or init_from, part, seed=online.seed, head="score")
    params = {"policy": policy, "value": value}
    shardings = {"policy": part.shardings(models.logical_axes(config), policy),
                 "value": part.shardings(models.logical_axes(v_config), value)}
    roller = make_roller(graphdef, config, tok, part, rollout, environment, value_graphdef=v_graphdef, owner="ppo")
    advantages = jax.jit(functools.partial(ppo_advantages, kl_estimator=kl_estimator, gamma=gamma, lam=lam,
                                           whiten_rewards=whiten_rewards))
    reference = reference_policy(policy)
    method = PPORollouts(roller, reference, part, advantages, kl_coef, AdaptiveKLController(kl_target, kl_horizon))
    evaluate = online_evaluator(eval_data, roller, online, lambda p: p["policy"], lambda p: reference(p["policy"]))
    prompts = make_prompt_pipeline(rows, tok, online.max_prompt_len, online.prompts_per_rollout,
                                   online.seed, num_epochs=None)
    batches = RolloutBatches(method, prompts, part, rows=online.prompts_per_rollout * rollout.group_size,
                             minibatch_size=minibatch_size, epochs=ppo_epochs, seed=online.seed)
    summary: dict = {}
    with part.activate():
        state = fit_online(run_dir=run, loss_fn=make_ppo_loss(graphdef, config, v_graphdef), params=params,
                           param_shardings=shardings, partitioner=part, batches=batches, online=online,
                           model_config=config, summary=summary, evaluate=evaluate)
    summary["step"] = int(state.step)
    return finish_run(run, config, state, tok, summary, method="ppo", init_from=init_from,
                      data={"prompts": train_data, "eval": eval_data}, params=state.params["policy"],
                      also={"value": (v_config, state.params["value"], value_from or init_from)})
