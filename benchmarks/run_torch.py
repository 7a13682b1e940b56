"""PyTorch side of the benchmark: TRL's trainers and the bare torch loop they run, timed per step.

Two systems, each in its own process (started by ``cpu_workload.py``), both
loading the ``LlamaForCausalLM`` that jaxpost exported with ``save_hf``:

* ``trl``: ``trl.SFTTrainer`` / ``trl.DPOTrainer`` (reference model = a
  frozen copy run every step, ``precompute_ref_log_probs=False``), timed by
  a ``TrainerCallback``: a step is the wall time between consecutive
  ``on_step_end`` events, so it holds everything the trainer does per step
  (data collation, forward/backward, clipping, AdamW, its per-step metrics
  such as entropy and token accuracy, logging).
* ``torch``: the forward/backward/clip/AdamW loop alone, on the same
  tensors, without any trainer machinery: the floor TRL could reach.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import workload as W


def _setup_torch(threads: int):
    import torch

    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return torch


def _device(torch):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _info(torch) -> dict:
    if torch.cuda.is_available():
        return {"device_kind": torch.cuda.get_device_name(0), "platform": "gpu", "n_devices": 1}
    return {"device_kind": "cpu", "platform": "cpu", "n_devices": 1, "torch_threads": torch.get_num_threads()}


def _summary(times, losses, warmup, setup_s, extra) -> dict:
    measured = times[warmup:]
    return {"setup_s": setup_s, "first_step_s": times[0], "step_s": measured,
            "median_step_s": float(np.median(measured)), "losses": losses, **extra}


def run_trl(task: str, model_dir: str, shape: W.Shape, steps: int, warmup: int, dtype: str = "float32",
            threads: int = 2) -> dict:
    """Train with TRL's trainer for ``warmup + steps`` steps; per-step times from ``on_step_end``.

    ``first_step_s`` = from ``trainer.train()`` to the end of the first step
    (dataloader start, first forward/backward/update). Trainer construction
    (dataset tokenisation, reference-model copy) is ``setup_s``.
    """
    torch = _setup_torch(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

    t_setup = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], None

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    common = dict(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), max_steps=warmup + steps,
                  per_device_train_batch_size=shape.batch, gradient_accumulation_steps=1,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, dataloader_pin_memory=False, bf16=(dtype == "bfloat16"),
                  use_cpu=not torch.cuda.is_available(), max_length=shape.seq)
    timer = Timer()
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        ids = W.sft_ids(shape, vocab)
        ds = Dataset.from_dict({"input_ids": [list(map(int, r)) for r in ids]})
        args = SFTConfig(learning_rate=1e-4, packing=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    else:
        from trl import DPOConfig, DPOTrainer

        pairs = W.dpo_ids(shape, vocab)
        # Text that the word-level tokenizer maps back to exactly these ids (TRL's DPO only takes text).
        ds = Dataset.from_dict({
            "prompt": [W.ids_to_text(r) for r in pairs["prompt"]],
            "chosen": [" " + W.ids_to_text(r) for r in pairs["chosen"]],
            "rejected": [" " + W.ids_to_text(r) for r in pairs["rejected"]],
        })
        args = DPOConfig(learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                         **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        _check_dpo_tokens(trainer, pairs)
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    trainer.train()
    ends = [t0] + timer.ends
    times = [b - a for a, b in zip(ends[:-1], ends[1:])]
    return _summary(times, timer.losses, warmup, setup_s, _info(torch))


def _check_dpo_tokens(trainer, pairs):
    """Fail loudly if TRL's tokenisation did not reproduce the benchmark's ids."""
    row = trainer.train_dataset[0]
    for key, ref in (("prompt_ids", pairs["prompt"][0]), ("chosen_ids", pairs["chosen"][0]),
                     ("rejected_ids", pairs["rejected"][0])):
        got = np.asarray(row[key])
        if got.shape != ref.shape or not (got == ref).all():
            raise RuntimeError(f"TRL's DPO dataset {key} of row 0 differs from the benchmark ids: "
                               f"{got[:8]}... (len {got.size}) vs {ref[:8]}... (len {ref.size})")


def _token_logps(torch, model, input_ids, labels):
    """Sum over trained positions of ``log p(labels[t+1] | input_ids[:t+1])`` per row (HF label shift)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    logp = torch.gather(logits.log_softmax(-1), 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def run_torch(task: str, model_dir: str, shape: W.Shape, steps: int, warmup: int, dtype: str = "float32",
              threads: int = 2) -> dict:
    """The bare loop: ``loss.backward(); clip_grad_norm_(1.0); AdamW.step()`` on the same batch.

    SFT loss = ``LlamaForCausalLM(input_ids, labels=input_ids).loss`` (mean
    NLL over all next-token predictions). DPO loss =
    ``-log sigmoid(0.1 * ((pc - rc) - (pr - rr)))`` with summed completion
    log-probs from one forward over the concatenated ``[2B, L]`` batch, the
    reference forward under ``no_grad`` every step.
    """
    torch = _setup_torch(threads)
    import copy

    from transformers import LlamaForCausalLM

    t_setup = time.perf_counter()
    dev = _device(torch)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    model.train()
    vocab = model.config.vocab_size
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
    if task == "sft":
        ids = torch.as_tensor(W.sft_ids(shape, vocab), dtype=torch.long, device=dev)
        lr = 1e-4

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    else:
        pairs = W.dpo_ids(shape, vocab)
        ids = np.concatenate([np.concatenate([pairs["prompt"], pairs[s]], 1) for s in ("chosen", "rejected")], 0)
        ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
        labels = ids.clone()
        labels[:, :shape.prompt] = -100
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        lr = 1e-6
        B = shape.batch

        def loss_fn():
            with torch.no_grad():
                r = _token_logps(torch, ref, ids, labels)
            p = _token_logps(torch, model, ids, labels)
            margin = (p[:B] - r[:B]) - (p[B:] - r[B:])
            return -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    setup_s = time.perf_counter() - t_setup
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host sync, as the trainer's logging does
        times.append(time.perf_counter() - t0)
    return _summary(times, losses, warmup, setup_s, _info(torch))


def export_weights(gin_file: str, out_dir: str) -> str:
    """Write jaxpost's seed-0 weights (``create(config, seed=0)``) as a HF checkpoint + tokenizer."""
    from jaxpost.models import create, save_hf
    from run_jaxpost import model_config

    config = model_config(gin_file, "float32")
    _, params = create(config, seed=0)
    save_hf(out_dir, config, params, extra_config={"pad_token_id": W.PAD_ID, "eos_token_id": W.EOS_ID})
    W.build_tokenizer(config.vocab_size, out_dir)
    return os.fspath(out_dir)
