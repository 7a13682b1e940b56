"""Generic training core: state, optimizer, sharded step, checkpoints, metrics, loop.

Typical use::

    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    abstract = abstract_state(params, opt)
    shardings = state_shardings(abstract, param_shardings, partitioner, opt)
    state = init_sharded_state(params, opt, shardings)
    step = compile_train_step(make_train_step(loss_fn, opt), shardings,
                              batch_shardings(example_batch, partitioner), frozen_shardings)
    state = train(state=state, step_fn=step, batches=it, num_steps=1000,
                  checkpointer=Checkpointer(run_dir + "/ckpt", save_every=100),
                  writer=MetricsWriter(run_dir))
"""

from jaxpost.train.checkpoint import Checkpointer, Restored, abstract_with_shardings
from jaxpost.train.loop import BestCheckpoint, CheckpointableIterator, NonFiniteLossError, train
from jaxpost.train.metrics import (Console, MetricsWriter, ProgressBar, format_log_line, mfu, peak_flops_per_device,
                                   read_jsonl)
from jaxpost.train.optimizer import Optimizer, default_decay_mask, make_optimizer, make_schedule, path_mask
from jaxpost.train.state import TrainState, abstract_state, init_sharded_state, init_state, state_shardings
from jaxpost.train.trainable import stop_frozen_gradients
from jaxpost.train.step import (batch_shardings, compile_train_step, make_eval_step, make_train_step, scan_steps,
                                stack_batches)

__all__ = [
    "Checkpointer", "Restored", "abstract_with_shardings",
    "BestCheckpoint", "CheckpointableIterator", "NonFiniteLossError", "train",
    "Console", "MetricsWriter", "ProgressBar", "format_log_line", "mfu", "peak_flops_per_device", "read_jsonl",
    "Optimizer", "default_decay_mask", "make_optimizer", "make_schedule", "path_mask",
    "TrainState", "abstract_state", "init_sharded_state", "init_state", "state_shardings",
    "batch_shardings", "compile_train_step", "make_eval_step", "make_train_step", "scan_steps", "stack_batches",
]
__all__ += ["stop_frozen_gradients"]
