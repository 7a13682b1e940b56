"""KTO (Ethayarajh et al. 2024) on unpaired feedback, start to finish.

    jaxpost train --gin_file=configs/runs/kto.gin --gin.kto.init_from=runs/sft/final \\
        --gin.kto.train_data=data/feedback.jsonl --gin.kto.run_dir=runs/kto

The data is TRL's unpaired format: ``prompt``, ``completion`` and a boolean
``label`` (true: desirable, thumbs up), plain or conversational. The policy
starts from ``init_from``; the reference is a frozen copy of the same weights
(or of ``reference_from``; with LoRA and no ``reference_from``, the policy's
own base with the adapters off; with ``ReferenceSync.every``, a copy in the
state that follows the policy, as in DPO). The loss and its KL estimate are
those of TRL's ``KTOTrainer`` (:mod:`jaxpost.losses.kto`).
"""

from __future__ import annotations

import gin

from jaxpost import models
from jaxpost.algorithms import with_base_reference
from jaxpost.algorithms.kto import make_kto_loss
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import DataStats, check_run_inputs, report_data_stats, train_eval_split
from jaxpost.data.unpaired import make_unpaired_pipeline
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model, load_reference
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches
from jaxpost.train.fit import LoopConfig, finish_run, fit, make_evaluator
from jaxpost.train.reference_sync import ReferenceSync, check_sync, follow_policy
from jaxpost.train.run_dir import prepare_run_dir


@gin.configurable
def kto(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
        model: ModelConfig | None = None, init_from: str | None = None, reference_from: str | None = None,
        eval_data: str | None = None, eval_fraction: float | None = None, seq_len: int = 512,
        batch_size: int = 8, max_prompt_len: int | None = None, loop: LoopConfig | None = None) -> dict:
    """Trains a policy on unpaired desirable/undesirable examples with ``make_kto_loss``.

    ``batch_size`` (global, > 1) is also the set the KL estimate is taken
    over: each example's prompt is paired with the previous example's
    completion in the batch, as in TRL. ``max_prompt_len`` defaults to
    ``seq_len // 2``. Summary: final step, data counts and, with held-out
    rows, ``eval/loss``, ``eval/kl``, ``eval/rewards/chosen``,
    ``eval/rewards/rejected``, ``eval/rewards/margins``. ``loop`` and
    ``model`` default as in :func:`jaxpost.recipes.sft.sft`.
    """
    check_values("kto", locals())  # for callers that bypass gin; `jaxpost train` ran them
    loop, model, sync = build(LoopConfig, loop), build_if_bound(ModelConfig, model), build(ReferenceSync)
    if batch_size < 2:
        raise UserError(f"kto.batch_size={batch_size}: KTO estimates its KL term from the other examples of a "
                        "batch, so it needs batch_size >= 2 (TRL refuses 1 too)")
    tok, rows = check_run_inputs("kto", train_data=train_data, kind="unpaired", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data,
                                 other_models={"reference_from": reference_from})
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=loop.seed)
    param_shardings = part.shardings(models.logical_axes(config), params)
    loss_fn = make_kto_loss(graphdef, config)

    held_out = None
    if eval_data or eval_fraction:
        rows, held_out = train_eval_split(rows, eval_path=eval_data,
                                          eval_fraction=None if eval_data else eval_fraction, seed=loop.seed)
    pipeline = lambda r, **kw: make_unpaired_pipeline(r, tok, seq_len, batch_size, max_prompt_len=max_prompt_len,
                                                     **kw)

    frozen = frozen_shardings = trainable = follow = None
    check_sync(sync, loss_fn, config, precompute_reference=False)
    if config.lora is not None and reference_from is None:  # LoRA: the frozen base itself, adapters off
        loss_fn = with_base_reference(loss_fn)
    elif sync.every:  # TR-KTO: the reference joins the state and follows the policy
        loss_fn, params, param_shardings, trainable, follow = follow_policy(
            sync, loss_fn, params, load_reference(model, reference_from, params, part), param_shardings)
    else:
        frozen = {"reference": load_reference(model, reference_from, params, part)}
        frozen_shardings = {"reference": param_shardings}

    stats = DataStats()
    batches = MeshBatches(pipeline(rows, seed=loop.seed, stats=stats), part)
    evaluate = None
    if held_out is not None:
        evaluate = make_evaluator(make_eval_step(loss_fn),
                                  lambda: MeshBatches(pipeline(held_out, num_epochs=1, shuffle=False), part),
                                  loop.eval_batches, frozen=frozen)

    run_info: dict = {}
    # Policy forward+backward on 2B sequences (matched + KL), plus a reference forward over them.
    flops = config.flops_per_token(seq_len) * 2 * batch_size * seq_len * 4 / 3
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                    partitioner=part, batches=batches, loop=loop, frozen=frozen, frozen_shardings=frozen_shardings,
                    evaluate=evaluate, data_stats=stats, flops_per_step=flops, trainable_mask=trainable,
                    after_update=follow,
                    epoch_batches=lambda: pipeline(rows, seed=loop.seed, num_epochs=1), summary=run_info)
        summary = {"step": int(state.step), "loss_kind": loss_fn.kind, **run_info, **report_data_stats(stats, "KTO")}
    return finish_run(run, config, state, tok, summary, evaluate, method="kto", init_from=init_from,
                      data={"train": train_data, "eval": eval_data}, params=follow and state.params["policy"])
