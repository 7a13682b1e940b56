"""Supervised fine-tuning, start to finish (readable in one sitting).

    jaxpost train --gin_file=configs/experiments/demo/sft.gin

Data: ``text``, ``messages`` or ``prompt``/``completion`` rows (jsonl, json,
parquet, arrow or a Hub name). Loss on responses only unless
``train_on_prompt``; examples packed into fixed rows with segment ids.
"""

from __future__ import annotations

import gin

from jaxpost import models
from jaxpost.algorithms import make_sft_eval, make_sft_loss
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import DataStats, check_run_inputs, make_lm_pipeline, report_data_stats, train_eval_split
from jaxpost.models.config import ModelConfig
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import MeshBatches
from jaxpost.train.fit import LoopConfig, finish_run, fit, make_evaluator
from jaxpost.train.run_dir import prepare_run_dir


@gin.configurable
def sft(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
        model: ModelConfig | None = None, init_from: str | None = None, eval_data: str | None = None,
        eval_fraction: float | None = None, seq_len: int = 512, batch_size: int = 8, packing: bool = True,
        train_on_prompt: bool = False, chunk_size: int = 512, loop: LoopConfig | None = None) -> dict:
    """Trains a causal LM on instruction data; exports ``run_dir/final`` (HF format).

    Returns the summary: final train loss and, when held-out data is given
    (``eval_data`` file or ``eval_fraction`` of the training rows), the
    held-out loss and token accuracy. ``loop`` (default: ``LoopConfig()`` with its gin bindings) and
    ``model`` (default: ``ModelConfig()`` where gin binds any of its fields) are built at call time.
    """
    check_values("sft", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of LoopConfig/ModelConfig apply without `sft.loop = @LoopConfig()`.
    loop, model = build(LoopConfig, loop), build_if_bound(ModelConfig, model)
    tok, rows = check_run_inputs("sft", train_data=train_data, kind="lm", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data)
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=loop.seed)
    param_shardings = part.shardings(models.logical_axes(config), params)

    held_out = None
    if eval_data or eval_fraction:
        rows, held_out = train_eval_split(rows, eval_path=eval_data, eval_fraction=None if eval_data else eval_fraction,
                                          seed=loop.seed)
    stats = DataStats()

    def train_pipeline(**kw):  # the training stream; num_epochs=1 gives one epoch, for LoopConfig.num_epochs
        return make_lm_pipeline(rows, tok, seq_len, batch_size, loop.seed, packing=packing,
                                train_on_prompt=train_on_prompt, **kw)
    batches = MeshBatches(train_pipeline(stats=stats), part)

    evaluate = None
    if held_out is not None:
        def eval_batches():
            return MeshBatches(make_lm_pipeline(held_out, tok, seq_len, batch_size, 0, packing=packing,
                                                train_on_prompt=train_on_prompt, num_epochs=1, shuffle=False), part)
        evaluate = make_evaluator(make_sft_eval(graphdef, config, chunk_size), eval_batches, loop.eval_batches)

    run_info: dict = {}  # fit's decisions: num_steps from epochs, best state, early stop
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=make_sft_loss(graphdef, config, chunk_size), params=params,
                    param_shardings=param_shardings, partitioner=part, batches=batches, loop=loop,
                    evaluate=evaluate, flops_per_step=config.flops_per_token(seq_len) * batch_size * seq_len,
                    data_stats=stats, epoch_batches=lambda: train_pipeline(num_epochs=1), summary=run_info)
        summary = {"step": int(state.step), **run_info, **report_data_stats(stats, "SFT")}
    return finish_run(run, config, state, tok, summary, evaluate, method="sft", init_from=init_from,
                      data={"train": train_data, "eval": eval_data})

