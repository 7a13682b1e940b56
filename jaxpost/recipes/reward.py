"""Reward model training (RLHF stage 2), start to finish.

    jaxpost train --gin_file=configs/experiments/demo/reward.gin

A transformer with a scalar head, initialised from an SFT policy (its body;
the head starts from scratch) or a Hugging Face checkpoint, trained on
``prompt``/``chosen``/``rejected`` pairs with the Bradley-Terry loss. The
result, exported as a Hugging Face ``*ForSequenceClassification``
directory, is what PPO and the data tools load as a scorer.
"""

from __future__ import annotations

import gin

from jaxpost import models
from jaxpost.algorithms import make_reward_loss
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import DataStats, check_run_inputs, make_preference_pipeline, report_data_stats, train_eval_split
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches
from jaxpost.train.fit import LoopConfig, finish_run, fit, make_evaluator
from jaxpost.train.run_dir import prepare_run_dir


@gin.configurable
def reward_model(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
                 model: ModelConfig | None = None, init_from: str | None = None, eval_data: str | None = None,
                 eval_fraction: float | None = None, seq_len: int = 512, batch_size: int = 8,
                 max_prompt_len: int | None = None, packing: bool = False, shared_prompt: bool = False,
                 loop: LoopConfig | None = None) -> dict:
    """Trains a Bradley-Terry reward model; exports ``run_dir/final``.

    ``packing``: several whole pairs per row of ``2 * seq_len`` tokens (see
    :func:`jaxpost.data.make_preference_pipeline`); ``batch_size`` counts rows.
    ``shared_prompt``: one row per pair with the prompt run once for both
    replies (see :func:`jaxpost.recipes.dpo.dpo`).

    Summary: final step, data counts and, with held-out pairs, ``eval/accuracy``
    (fraction of pairs ranked correctly), ``eval/margin`` and ``eval/loss``.
    ``loop`` and ``model`` default as in :func:`jaxpost.recipes.sft.sft`.
    """
    check_values("reward_model", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of LoopConfig/ModelConfig apply without `reward_model.loop = @LoopConfig()`.
    loop, model = build(LoopConfig, loop), build_if_bound(ModelConfig, model)
    tok, rows = check_run_inputs("reward_model", train_data=train_data, kind="preference",
                                 tokenizer=tokenizer, init_from=init_from, model=model, eval_data=eval_data)
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=loop.seed, head="score")
    param_shardings = part.shardings(models.logical_axes(config), params)
    loss_fn = make_reward_loss(graphdef, config)

    held_out = None
    if eval_data or eval_fraction:
        rows, held_out = train_eval_split(rows, eval_path=eval_data,
                                          eval_fraction=None if eval_data else eval_fraction, seed=loop.seed)
    stats = DataStats()
    pipeline = lambda r, **kw: make_preference_pipeline(r, tok, seq_len, batch_size, max_prompt_len=max_prompt_len,
                                                       packing=packing, shared_prompt=shared_prompt, **kw)
    batches = MeshBatches(pipeline(rows, seed=loop.seed, stats=stats), part)
    evaluate = None
    if held_out is not None:
        evaluate = make_evaluator(make_eval_step(loss_fn),
                                  lambda: MeshBatches(pipeline(held_out, num_epochs=1, shuffle=False), part),
                                  loop.eval_batches)

    run_info: dict = {}  # fit's decisions: num_steps from epochs, best state, early stop
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                    partitioner=part, batches=batches, loop=loop, evaluate=evaluate, data_stats=stats,
                    flops_per_step=config.flops_per_token(seq_len) * 2 * batch_size * seq_len,
                    epoch_batches=lambda: pipeline(rows, seed=loop.seed, num_epochs=1), summary=run_info)
        summary = {"step": int(state.step), **run_info, **report_data_stats(stats, "reward")}
    return finish_run(run, config, state, tok, summary, evaluate, method="reward_model", init_from=init_from,
                      data={"train": train_data, "eval": eval_data})
