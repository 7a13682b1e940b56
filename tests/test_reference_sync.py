"""TR-DPO: a reference that follows the policy, against a frozen-reference DPO loop mixed by hand; resumes of TR-DPO,
TR-KTO and synced-reference GRPO runs; GRPO's rollouts read the synced reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from jaxpost import models
from jaxpost.algorithms import make_dpo_loss
from jaxpost.data import build_tokenizer, make_preference_pipeline
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.train import make_train_step
from jaxpost.train.reference_sync import ReferenceSync, follow_policy
from jaxpost.train.state import init_state
from pipeline_utils import make_task, read_metrics, run_task

TINY = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _batches(n_steps):
    tok = build_tokenizer(None, vocab_size=261)
    rng = np.random.default_rng(0)
    word = lambda k: "".join(rng.choice(list("abcdefghij"), size=k))
    rows = [{"prompt": word(3), "chosen": word(int(rng.integers(2, 6))), "rejected": word(int(rng.integers(2, 6)))}
            for _ in range(8 * n_steps)]
    it = make_preference_pipeline(rows, tok, 24, 8, num_epochs=1, shuffle=False)
    return [{k: jnp.asarray(v) for k, v in b.items()} for b, _ in zip(it, range(n_steps))]


def test_reference_is_mixed_after_every_kth_step_exactly_as_tr_dpo_says():
    config = ModelConfig(**TINY)
    graphdef, policy = models.create(config, seed=0)
    _, reference = models.create(config, seed=1)  # another model, so that the mix is visible
    loss_fn = make_dpo_loss(graphdef, config, beta=0.5)
    sync = ReferenceSync(every=2, alpha=0.6)
    batches = _batches(5)

    # jaxpost: the reference in the state, mixed inside the compiled step.
    wrapped, params, _, mask, after = follow_policy(sync, loss_fn, policy, reference, None)
    opt = optax.masked(optax.adam(1e-2), mask)
    step = jax.jit(make_train_step(wrapped, opt, after_update=after))
    state = init_state(params, opt)
    ours = []
    for b in batches:
        state, metrics = step(state, b)
        ours.append((jax.device_get(state.params), float(metrics["loss"])))

    # By hand: plain DPO steps against a frozen reference, mixed in numpy after steps 2 and 4 (TRL's callback).
    plain_opt = optax.adam(1e-2)
    plain = jax.jit(make_train_step(loss_fn, plain_opt))
    p_state, ref = init_state(policy, plain_opt), jax.device_get(reference)
    for k, b in enumerate(batches, start=1):
        p_state, metrics = plain(p_state, b, {"reference": ref})
        pol = jax.device_get(p_state.params)
        if k % 2 == 0:
            ref = jax.tree.map(lambda p, r: (1.0 - 0.6) * r + 0.6 * p, pol, ref)
        got, loss = ours[k - 1]
        assert loss == pytest.approx(float(metrics["loss"]), rel=1e-6), k
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got["policy"], pol)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got["reference"], ref)
    # Step 1 left the reference as it was; step 2 moved it 60% of the way to the policy.
    first = jax.tree.leaves(ours[0][0]["reference"])[0]
    np.testing.assert_array_equal(first, jax.tree.leaves(jax.device_get(reference))[0])
    assert not np.array_equal(jax.tree.leaves(ours[1][0]["reference"])[0], first)
    # The optimizer holds no state for the reference.
    assert not any(x.size for x in jax.tree.leaves(state.opt_state.inner_state[0].mu["reference"]))


def test_settings_are_checked():
    with pytest.raises(UserError, match=r"^ReferenceSync.every must be an int >= 0"):
        ReferenceSync(every=-1)
    with pytest.raises(UserError, match=r"^ReferenceSync.alpha must be in \(0, 1\], got 1.5"):
        ReferenceSync(every=4, alpha=1.5)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return make_task(root, n_sft=20, n_pref=64, n_prompts=8, n_eval=8)


def _bindings(method, data, task, run_dir, extra=()):
    return [f"{method}.run_dir = '{run_dir}'", f"{method}.train_data = '{data}'",
            f"{method}.tokenizer = '{task['tokenizer']}'", f"{method}.seq_len = 64", f"{method}.batch_size = 8",
            "LoopConfig.num_steps = 6", "LoopConfig.save_every = 3", "LoopConfig.log_every = 1",
            "make_optimizer.learning_rate = 1e-3", "make_optimizer.warmup_steps = 0",
            "ReferenceSync.every = 2", "ReferenceSync.alpha = 0.5", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_resumed_tr_run_equals_an_uninterrupted_one(task, tmp_path, method):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    data = task["preference"] if method == "dpo" else _unpaired(task["preference"], tmp_path / "feedback.jsonl")
    bindings = lambda run_dir, extra=(): _bindings(method, data, task, run_dir, extra)  # noqa: E731
    summary = run_task(method, bindings(whole))
    assert summary["step"] == 6
    run_task(method, bindings(cut))
    # Lose everything after step 3: the rerun restores policy and reference from checkpoint 3.
    shutil.rmtree(cut / "checkpoints" / "6")
    shutil.rmtree(cut / "final")
    run_task(method, bindings(cut))
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The export is the policy alone, in the plain layout, and it trained away from the synced-reference start.
    plain = run_task(method, bindings(tmp_path / "frozen", ["ReferenceSync.every = 0"]))
    c = load_file(tmp_path / "frozen" / "final" / "model.safetensors")
    assert c.keys() == a.keys() and plain["step"] == 6
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # a moving reference changes the policy's updates


def _unpaired(pairs: Path, out: Path) -> Path:
    """TRL's unpaired rows from preference pairs: the chosen reply thumbs up, the rejected one down."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}) + "\n"
                           for r in rows for side in ("chosen", "rejected")))
    return out


def _grpo_bindings(task, run_dir, extra=()):
    return [f"grpo.run_dir = '{run_dir}'", f"grpo.train_data = '{task['prompts']}'",
            f"grpo.tokenizer = '{task['tokenizer']}'", "make_scorer.reward_functions = [@make_reward()]",
            "make_reward.names = ['length']", "RolloutConfig.max_new_tokens = 8", "RolloutConfig.group_size = 2",
            "OnlineConfig.prompts_per_rollout = 4", "OnlineConfig.num_rollouts = 6", "OnlineConfig.save_every = 3",
            "OnlineConfig.max_prompt_len = 16", "make_optimizer.learning_rate = 1e-2", "make_optimizer.warmup_steps = 0",
            "make_grpo_loss.beta = 0.1", *extra]


def test_grpo_rollouts_measure_kl_to_the_synced_reference(task, tmp_path):
    """One update per rollout; the reference copies the policy (alpha 1) after steps 2 and 4. Rollout r samples
    after step r - 1, so its reference is its policy, and its KL exactly 0, for r = 1, 3, 5 alone."""
    run_task("grpo", _grpo_bindings(task, tmp_path / "sync", ["ReferenceSync.every = 2", "ReferenceSync.alpha = 1.0"]))
    kl = {m["step"]: m["objective/kl"] for m in read_metrics(tmp_path / "sync") if "objective/kl" in m}
    assert sorted(kl) == [1, 2, 3, 4, 5, 6]
    assert [kl[r] == 0.0 for r in range(1, 7)] == [True, False, True, False, True, False], kl
    run_task("grpo", _grpo_bindings(task, tmp_path / "frozen"))
    frozen = {m["step"]: m["objective/kl"] for m in read_metrics(tmp_path / "frozen") if "objective/kl" in m}
    assert frozen[1] == 0.0 and all(frozen[r] != 0.0 for r in range(2, 7)), frozen  # the initial policy throughout


def test_grpo_refuses_a_sync_with_nothing_to_follow(task, tmp_path):
    with pytest.raises(UserError, match=r"^ReferenceSync.every=2: make_grpo_loss.beta = 0 puts no KL"):
        run_task("grpo", _grpo_bindings(task, tmp_path / "r", ["ReferenceSync.every = 2", "make_grpo_loss.beta = 0.0"]))
    with pytest.raises(UserError, match=r"^ReferenceSync.every=2: a LoRA policy's adapters cannot be mixed"):
        run_task("grpo", _grpo_bindings(task, tmp_path / "l", ["ReferenceSync.every = 2",
                                                               "ModelConfig.lora = @LoraConfig()"]))


@pytest.mark.slow
def test_a_resumed_synced_grpo_run_equals_an_uninterrupted_one(task, tmp_path):
    bindings = lambda run_dir: _grpo_bindings(task, run_dir, ["ReferenceSync.every = 2",  # noqa: E731
                                                              "ReferenceSync.alpha = 0.5"])
    run_task("grpo", bindings(tmp_path / "whole"))
    run_task("grpo", bindings(tmp_path / "cut"))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")  # the rerun restores policy and reference from rollout 3
    shutil.rmtree(tmp_path / "cut" / "final")
    summary = run_task("grpo", bindings(tmp_path / "cut"))
    assert summary["rollout"] == 6
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "whole")[-1]["objective/kl"] == read_metrics(tmp_path / "cut")[-1]["objective/kl"]
