"""DPO and its relatives (every ``make_dpo_loss.kind``), start to finish.

    jaxpost train --gin_file=configs/experiments/demo/dpo.gin

The policy starts from ``init_from`` (usually an SFT export); the reference
is a frozen copy of the same weights (or of ``reference_from``), or, with
``ReferenceSync.every`` (TR-DPO), a copy in the state that follows the policy.
``precompute_reference=True``: reference log-probs computed once, stored
beside the run, and the reference weights dropped before training. LoRA
(``ModelConfig.lora``) without ``reference_from``: the reference is the
policy's own frozen base, adapters off, no second copy.
"""

from __future__ import annotations

import gin

from jaxpost import models
from jaxpost.algorithms import make_dpo_loss, with_base_reference
from jaxpost.algorithms.preference import dpo_flops
from jaxpost.algorithms.reference import with_reference_logps
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import DataStats, check_run_inputs, make_preference_pipeline, report_data_stats, train_eval_split
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model, load_reference
from jaxpost.models.lora import without_adapters
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches
from jaxpost.train.fit import LoopConfig, finish_run, fit, make_evaluator
from jaxpost.train.reference_sync import ReferenceSync, check_sync, follow_policy
from jaxpost.train.run_dir import prepare_run_dir


@gin.configurable
def dpo(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
        model: ModelConfig | None = None, init_from: str | None = None, reference_from: str | None = None,
        precompute_reference: bool = False, eval_data: str | None = None, eval_fraction: float | None = None,
        seq_len: int = 512, batch_size: int = 8, max_prompt_len: int | None = None, packing: bool = False,
        shared_prompt: bool = False, loop: LoopConfig | None = None) -> dict:
    """Trains a policy on preference pairs with the loss ``make_dpo_loss`` is configured with.

    ``packing``: padding-free batches, several whole pairs per row of
    ``2 * seq_len`` tokens (see :func:`jaxpost.data.make_preference_pipeline`);
    the same pairs, the same per-pair loss, fewer rows when replies are short.
    ``batch_size`` then counts rows, so each step carries more pairs.
    ``shared_prompt``: one row per pair, the prompt run once for both
    replies (``max_prompt_len`` prompt slots, ``seq_len - max_prompt_len``
    per reply); the same loss at ``P + 2R`` tokens per pair instead of
    ``2 seq_len``, and no LM head on prompt slots.

    Summary: final step, data counts and, with held-out pairs,
    ``eval/rewards/accuracies`` (fraction of pairs whose implicit reward
    ranks chosen above rejected), ``eval/rewards/margins`` and ``eval/loss``.
    ``loop`` and ``model`` default as in :func:`jaxpost.recipes.sft.sft`.
    """
    check_values("dpo", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of LoopConfig/ModelConfig apply without `dpo.loop = @LoopConfig()`.
    loop, model, sync = build(LoopConfig, loop), build_if_bound(ModelConfig, model), build(ReferenceSync)
    tok, rows = check_run_inputs("dpo", train_data=train_data, kind="preference", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data,
                                 other_models={"reference_from": reference_from})
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=loop.seed)
    param_shardings = part.shardings(models.logical_axes(config), params)
    loss_fn = make_dpo_loss(graphdef, config)

    held_out = None
    if eval_data or eval_fraction:
        rows, held_out = train_eval_split(rows, eval_path=eval_data,
                                          eval_fraction=None if eval_data else eval_fraction, seed=loop.seed)
    pipeline = lambda r, **kw: make_preference_pipeline(r, tok, seq_len, batch_size,
                                                       max_prompt_len=max_prompt_len, packing=packing,
                                                       shared_prompt=shared_prompt, **kw)

    frozen = frozen_shardings = trainable = follow = None
    base_reference = config.lora is not None and reference_from is None
    check_sync(sync, loss_fn, config, precompute_reference)
    if loss_fn.needs_reference:
        if base_reference:  # LoRA: the frozen base itself, adapters off
            ref_params = without_adapters(params)
        else:
            ref_params = load_reference(model, reference_from, params, part)
        if precompute_reference:
            cached = lambda r, name: with_reference_logps(r, graphdef, config, ref_params, pipeline, part, run / name,
                                                          ld_alpha=loss_fn.ld_alpha)
            with part.activate():
                rows = cached(rows, "reference")
                held_out = None if held_out is None else cached(held_out, "reference_eval")
            del ref_params
        elif base_reference:
            del ref_params
            loss_fn = with_base_reference(loss_fn)
        elif sync.every:  # TR-DPO: the reference joins the state and follows the policy
            loss_fn, params, param_shardings, trainable, follow = follow_policy(sync, loss_fn, params, ref_params,
                                                                              param_shardings)
        else:
            frozen, frozen_shardings = {"reference": ref_params}, {"reference": param_shardings}
    online_reference = loss_fn.needs_reference and not precompute_reference

    stats = DataStats()
    batches = MeshBatches(pipeline(rows, seed=loop.seed, stats=stats), part)
    evaluate = None
    if held_out is not None:
        evaluate = make_evaluator(make_eval_step(loss_fn),
                                  lambda: MeshBatches(pipeline(held_out, num_epochs=1, shuffle=False), part),
                                  loop.eval_batches, frozen=frozen)

    run_info: dict = {}  # fit's decisions: num_steps from epochs, best state, early stop
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                    partitioner=part, batches=batches, loop=loop, frozen=frozen, frozen_shardings=frozen_shardings,
                    evaluate=evaluate, data_stats=stats, trainable_mask=trainable, after_update=follow,
                    flops_per_step=dpo_flops(config, seq_len, batch_size, online_reference),
                    epoch_batches=lambda: pipeline(rows, seed=loop.seed, num_epochs=1), summary=run_info)
        summary = {"step": int(state.step), "loss_kind": loss_fn.kind, **run_info, **report_data_stats(stats, "DPO")}
    return finish_run(run, config, state, tok, summary, evaluate, method="dpo", init_from=init_from,
                      data={"train": train_data, "eval": eval_data}, params=follow and state.params["policy"])

