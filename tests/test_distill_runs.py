"""Distillation runs end to end on the reversal task: a trained 3-layer teacher -> a narrower 2-layer student."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.algorithms import make_sft_eval
from jaxpost.data import load_tokenizer, make_lm_pipeline
from jaxpost.models.hf import load_hf
from jaxpost.paths import jsonl_lines
from pipeline_utils import make_task, read_metrics, run_task

STUDENT = ["ModelConfig.hidden_size = 32", "ModelConfig.intermediate_size = 64", "ModelConfig.num_heads = 2",
           "ModelConfig.num_kv_heads = 1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    task = make_task(root, n_sft=400, n_pref=8, n_prompts=16, n_eval=32)
    clean = root / "data" / "heldout.jsonl"  # held-out words with their correct reversal
    with clean.open("w") as f:
        for r in map(json.loads, task["eval_prompts"].read_text().splitlines()):
            f.write(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["answer"]}]}) + "\n")
    task["heldout"] = clean
    run_task("sft", [f"sft.run_dir = '{root / 'teacher'}'", f"sft.train_data = '{task['sft']}'",
                     f"sft.tokenizer = '{task['tokenizer']}'", "sft.seq_len = 64", "sft.batch_size = 8",
                     "ModelConfig.num_layers = 3", "LoopConfig.num_steps = 60", "LoopConfig.log_every = 20",
                     "make_optimizer.learning_rate = 3e-3"])
    task["teacher"] = root / "teacher" / "final"
    return task


def heldout_nll(model_dir: Path | None, task, student_seed_dir: Path | None = None) -> float:
    """Token-mean NLL of the correct held-out answers under a model (HF directory)."""
    config, graphdef, params = load_hf(model_dir)
    tok = load_tokenizer(task["tokenizer"])
    from jaxpost.data import load_rows
    ev = jax.jit(make_sft_eval(graphdef, config))
    nll = n = 0.0
    for b in make_lm_pipeline(load_rows(task["heldout"]), tok, 64, 8, packing=False, num_epochs=1, shuffle=False):
        m = ev(params, {k: jnp.asarray(v) for k, v in b.items()})
        nll += float(m["loss"]) * float(m["loss_tokens"])
        n += float(m["loss_tokens"])
    return nll / n


def _bindings(task, run_dir, steps, extra=()):
    return [f"distill.run_dir = '{run_dir}'", f"distill.train_data = '{task['sft']}'",
            f"distill.tokenizer = '{task['tokenizer']}'", f"distill.teacher_from = '{task['teacher']}'",
            "distill.seq_len = 64", "distill.batch_size = 8", f"LoopConfig.num_steps = {steps}",
            "LoopConfig.log_every = 1", "make_optimizer.learning_rate = 3e-3", *STUDENT, *extra]


@pytest.mark.slow
def test_offline_distillation_closes_most_of_the_gap_to_the_teacher(setup, tmp_path):
    # Steps 0: the untrained student, exported as-is.
    run_task("distill", _bindings(setup, tmp_path / "s0", 1, ["make_optimizer.learning_rate = 0.0"]))
    summary = run_task("distill", _bindings(setup, tmp_path / "kd", 60, ["distill.temperature = 1.0",
                                                                         "distill.alpha = 1.0"]))
    assert summary["step"] == 60 and summary["data/examples"] > 0
    curve = {m["step"]: m for m in read_metrics(tmp_path / "kd") if "distill_loss" in m}
    assert np.mean([curve[s]["distill_loss"] for s in (58, 59, 60)]) < 0.5 * np.mean(
        [curve[s]["distill_loss"] for s in (1, 2, 3)])
    teacher, untrained = heldout_nll(setup["teacher"], setup), heldout_nll(tmp_path / "s0" / "final", setup)
    student = heldout_nll(tmp_path / "kd" / "final", setup)
    assert teacher < untrained
    closed = (untrained - student) / (untrained - teacher)
    assert closed > 0.6, (untrained, student, teacher)
    assert load_hf(tmp_path / "kd" / "final")[0].num_layers == 2


@pytest.mark.slow
def test_on_policy_gkd_runs_end_to_end(setup, tmp_path):
    lmbda, steps = 0.5, 4
    summary = run_task("distill", _bindings(setup, tmp_path / "gkd", steps, [
        "distill.mode = 'on_policy'", "distill.divergence = 'jsd'", f"distill.lmbda = {lmbda}",
        "distill.max_prompt_len = 48", "distill.sampling = @SamplingConfig()", "SamplingConfig.temperature = 1.0",
        f"distill.eval_data = '{setup['heldout']}'", "LoopConfig.eval_batches = 2", "OnlineConfig.samples_every = 1"]))
    coins = [np.random.default_rng([0, i]).random() < lmbda for i in range(steps)]
    records = read_metrics(tmp_path / "gkd")
    assert [r["on_policy"] for r in records] == [float(c) for c in coins]
    assert summary["on_policy_steps"] == sum(coins) and summary["step"] == steps
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] >= 0
        assert ("rollout/completion_length" in r) == bool(r["on_policy"])
    assert np.isfinite(summary["eval/distill_loss"])
    assert (tmp_path / "gkd" / "final" / "config.json").exists()
    # The samples log holds the steps that sampled (1-based numbers), every row's prompt and the student's completion.
    logs = sorted((tmp_path / "gkd" / "samples").iterdir())
    assert [p.name for p in logs] == [f"rollout_{i + 1:06d}.jsonl" for i in range(steps) if coins[i]]
    for path in logs:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 8 and {r["rollout"] for r in rows} == {int(path.stem.split("_")[1])}
        assert all(r["prompt"] and isinstance(r["completion"], str) and 1 <= r["completion_tokens"] <= 16
                   for r in rows), rows


@pytest.mark.slow
def test_sequence_kd_and_cached_teacher_runs(setup, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(setup["sft"].read_text().splitlines(keepends=True)[:16]))
    summary = run_task("distill", _bindings(setup, tmp_path / "seq", 3, [
        f"distill.train_data = '{small}'", "distill.mode = 'sequence'", "distill.sampling = @SamplingConfig()",
        "SamplingConfig.max_new_tokens = 12", "distill.teacher_samples_per_prompt = 2",
        "distill.teacher_batch_size = 5"]))  # 16 prompts: the last sampler call is a partial batch
    text = (tmp_path / "seq" / "teacher_samples.jsonl").read_text(encoding="utf-8")
    samples = [json.loads(x) for x in jsonl_lines(text)]
    assert len(samples) == 32 and summary["teacher_samples"] == 32 and summary["step"] == 3
    assert all(s["prompt"][-1]["role"] == "user" for s in samples)

    cache = tmp_path / "cache"
    summary = run_task("distill", _bindings(setup, tmp_path / "cached", 3, [
        f"distill.train_data = '{small}'", f"distill.teacher_cache = '{cache}'", "distill.top_k = 8"]))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_rows"] == 16 and meta["top_k"] == 8 and summary["step"] == 3
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tmp_path / "cached"))
