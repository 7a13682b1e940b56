"""Online training pieces: rollout layout and log-probs, missing-EOS penalty, pairs, PPO advantages and loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.algorithms.online import make_ppo_loss, make_rollout_logprobs, ppo_advantages
from jaxpost.data import make_prompt_pipeline
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.models import create, forward, scores
from jaxpost.train.batches import on_mesh
from jaxpost.train.online import OnlineConfig, RolloutBatches, Stateless, fit_online, minibatch_orders
from jaxpost.generate.rollout import Roller, RolloutConfig, best_worst_pairs, pair_batch, rollout_sequences
from jaxpost.generate.scorers import FunctionScorer
from jaxpost.sharding import Partitioner
from jaxpost.train import NonFiniteLossError
from jaxpost.errors import UserError

from online_helpers import CONFIG, model, tok  # noqa: F401 (fixtures)
N = 6




def prompt_batch(tok, n=8, seed=0):
    rows = [{"prompt": f"question {i} " * (1 + i % 3), "answer": str(i)} for i in range(n)]
    return next(make_prompt_pipeline(rows, tok, 16, n, seed, num_epochs=None))


def test_rollout_sequences_layout_by_hand():
    out = rollout_sequences(np.array([[0, 7, 8]]), np.array([[0, 1, 1]]), np.array([[9, 2, 0]]),
                            np.array([[1.0, 1.0, 0.0]]), pad=0)
    np.testing.assert_array_equal(out["tokens"], [[0, 7, 8, 9, 2, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(out["targets"], [[0, 8, 9, 2, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 0, 0]])


def test_rollout_logprobs_equal_sampler_and_scorer_gets_rows(tok, model):
    graphdef, params = model
    part = Partitioner()
    seen = {}

    def reward(prompts, completions, answer, **_):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        return [float(len(c)) for c in completions]

    # A quarter of the vocabulary stops a row, so that some rows stop early whatever the draws.
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=2, stop_token_ids=tuple(range(3, 259, 4)))
    roller = Roller(graphdef, CONFIG, tok, part, FunctionScorer(reward), rcfg)
    pb = prompt_batch(tok, 4)
    rng = jax.random.PRNGKey(5)
    with part.activate():
        r = roller(params, params, None, pb, rng)
        out = jax.device_get(roller.sampler(params, pb["prompt_tokens"], pb["prompt_mask"], rng))
    P = pb["prompt_tokens"].shape[1]
    cm = out.completion_mask
    assert 0 < cm.sum() < cm.size  # some rows stopped early: the mask matters
    np.testing.assert_array_equal(r.host["tokens"][:, P:] * cm, out.tokens * cm)
    np.testing.assert_array_equal(r.host["loss_mask"][:, P - 1:P - 1 + N], cm)
    old = np.asarray(jax.device_get(r.batch["old_logp"]))
    np.testing.assert_allclose(old[:, P - 1:P - 1 + N], out.logprobs * cm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.device_get(r.batch["ref_logp"])), old, atol=1e-6)
    assert r.metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    # Group layout: completion 2b and 2b+1 belong to prompt b, and the scorer saw its row fields.
    assert seen["answer"] == [row["answer"] for row in pb["row"] for _ in range(2)]
    assert len(set(seen["answer"])) == 4
    assert seen["prompts"][::2] == pb["prompt"]
    np.testing.assert_array_equal(r.scores, [len(c) for c in r.completions])
    # A second rollout (other prompts, other key) reuses every compiled function.
    with part.activate():
        roller(params, params, None, prompt_batch(tok, 4, seed=1), jax.random.PRNGKey(6))
    assert len(roller.sampler.compiled_shapes) == 1 and roller._measure._cache_size() == 1


def test_roller_dispatches_the_measuring_before_scoring_and_the_rollout_is_unchanged(tok, model):
    """The measuring forwards need no scores: they are launched before the host scores, so slow rewards overlap
    them. Launched first, or waited for before scoring (no overlap), the rollout is the same."""
    graphdef, params = model
    part = Partitioner()
    # A quarter of the vocabulary stops a row, so that some rows stop early whatever the draws.
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=2, stop_token_ids=tuple(range(3, 259, 4)))
    events = []

    def reward(prompts, completions, **_):
        events.append("score")
        return [float(len(c)) for c in completions]

    def rollout(measure_first: bool):
        roller = Roller(graphdef, CONFIG, tok, part, FunctionScorer(reward), rcfg)
        measure = roller._measure

        def recorded(*args):
            events.append("measure")
            out = measure(*args)
            return jax.block_until_ready(out) if measure_first else out

        roller._measure = recorded
        with part.activate():
            return roller(params, params, None, prompt_batch(tok, 4), jax.random.PRNGKey(5))

    events.clear()
    overlapped = rollout(measure_first=False)
    assert events == ["measure", "score"]
    assert overlapped.metrics["time/score_s"] >= 0
    first = rollout(measure_first=True)
    assert set(overlapped.batch) == set(first.batch) >= {"old_logp", "ref_logp", "token_entropy", "tokens"}
    for k in overlapped.batch:
        np.testing.assert_array_equal(np.asarray(jax.device_get(overlapped.batch[k])),
                                      np.asarray(jax.device_get(first.batch[k])), err_msg=k)
    np.testing.assert_array_equal(overlapped.scores, first.scores)
    timeless = lambda m: {k: v for k, v in m.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"}
    assert timeless(overlapped.metrics) == timeless(first.metrics)


def test_a_reward_model_and_reward_functions_are_summed_and_each_logged(tok, model, tmp_path):
    """``make_scorer`` with both sources (as TRL's GRPO mixes them):
    ``score = w_rm * RM(x) + w * (1.0 * chars(x) + 2.0 * ends_with_a(x))``, each term logged unweighted."""
    from jaxpost.generate.rewards import make_reward, register_reward
    from jaxpost.generate.scorers import RewardModelScorer, make_scorer
    from jaxpost.models import ModelConfig
    from jaxpost.models.export import export

    graphdef, params = model
    rm_config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                            num_kv_heads=2, head="score")
    export(tmp_path / "rm", rm_config, create(rm_config, seed=11)[1], tok)
    chars = lambda prompts, completions, **_: [float(len(c)) for c in completions]
    register_reward("_test_chars")(chars)
    register_reward("_test_ends_with_a")(lambda prompts, completions, **_: [float(c.endswith("a")) for c in completions])
    part = Partitioner()
    scorer = make_scorer(part, reward_functions=[make_reward(["_test_chars", "_test_ends_with_a"], [1.0, 2.0])],
                         reward_weights=[0.5], reward_model=str(tmp_path / "rm" / "final"), reward_model_weight=-3.0,
                         policy_vocab_size=CONFIG.vocab_size)
    assert [(t.name, t.weight, t.on_devices) for t in scorer.terms] == [
        ("reward_model", -3.0, True), ("_test_chars", 0.5, False), ("_test_ends_with_a", 1.0, False)]
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=2, stop_token_ids=tuple(range(3, 259, 4)))
    roller = Roller(graphdef, CONFIG, tok, part, scorer, rcfg)
    with part.activate():
        r = roller(params, params, None, prompt_batch(tok, 4), jax.random.PRNGKey(5))
        rm = RewardModelScorer(str(tmp_path / "rm" / "final"), part)(r)
    n = np.array([len(c) for c in r.completions], np.float32)
    a = np.array([c.endswith("a") for c in r.completions], np.float32)
    assert n.std() > 0 and rm.std() > 0
    np.testing.assert_allclose(r.raw_scores, -3.0 * rm + 0.5 * n + 1.0 * a, rtol=1e-6, atol=1e-6)
    for name, values in (("reward_model", rm), ("_test_chars", n), ("_test_ends_with_a", a)):
        assert r.metrics[f"rewards/{name}/mean"] == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-6)
        assert r.metrics[f"rewards/{name}/std"] == pytest.approx(float(values.std()), rel=1e-6, abs=1e-6)
    # A make_reward() with no names (configs/runs/grpo.gin's default) adds no term; with nothing else, no source.
    only_rm = make_scorer(part, reward_functions=[make_reward([])], reward_model=str(tmp_path / "rm" / "final"))
    assert [t.name for t in only_rm.terms] == ["reward_model"]
    with pytest.raises(UserError, match="^make_scorer: give a reward source: "):
        make_scorer(part, reward_functions=[make_reward([])])
    # Two functions of one name log apart; a plug-in spec logs under its function's name.
    (tmp_path / "my_rewards.py").write_text("def exact(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    spec = f"{tmp_path / 'my_rewards.py'}:exact"
    assert [t.name for t in make_scorer(part, reward_functions=[chars, chars, "exact_match", spec]).terms] == [
        "<lambda>", "<lambda>_2", "exact_match", "exact"]


def test_grpo_mask_truncated_trains_no_token_of_a_cut_completion(tok, model):
    """DAPO's overlong filtering: rows that hit the budget without a stop token keep their advantages (their group's
    statistics) but get a zero loss mask, so the token-level loss is the mean of -A over the finished rows' tokens."""
    from jaxpost.losses import grpo_loss
    from jaxpost.recipes.grpo import GRPORollouts

    graphdef, params = model
    part = Partitioner()
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=2, stop_token_ids=tuple(range(3, 259, 4)))
    scorer = FunctionScorer(lambda prompts, completions, **_: [float(len(c)) for c in completions])
    rows = {}
    for mask_truncated in (False, True):
        method = GRPORollouts(Roller(graphdef, CONFIG, tok, part, scorer, rcfg), lambda p: p, "grpo", part,
                              mask_truncated=mask_truncated)
        with part.activate():
            out, _ = method.rollout(params, prompt_batch(tok, 4), jax.random.PRNGKey(5), 0)
        rows[mask_truncated] = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    finished = np.array([r["finished"] for r in method.samples])
    assert finished.any() and not finished.all()
    plain, masked = rows[False], rows[True]
    for k in plain:
        expected = plain[k] * finished[:, None] if k == "loss_mask" else plain[k]
        np.testing.assert_array_equal(masked[k], expected, err_msg=k)
    adv, n = masked["advantages"], masked["loss_mask"].sum(-1)
    loss, _ = grpo_loss(masked["old_logp"], masked["old_logp"], None, adv, masked["loss_mask"], aggregation="token")
    assert float(loss) == pytest.approx(float((-adv * n)[finished].sum() / n[finished].sum()), rel=1e-5)


def test_grpo_gdpo_advantages_normalise_each_reward_and_the_missing_eos_penalty(tok, model):
    """grpo.advantage='gdpo' with two weighted reward functions and a missing-EOS penalty: the rows' advantages are
    GDPO's, written out in numpy from the samples' own rewards (each term in its group, the weighted sum over the batch)."""
    from jaxpost.generate.rewards import make_reward, register_reward
    from jaxpost.generate.scorers import make_scorer
    from jaxpost.recipes.grpo import GRPORollouts

    graphdef, params = model
    part = Partitioner()
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=4, stop_token_ids=tuple(range(3, 259, 4)),
                         missing_eos_penalty=0.7)
    register_reward("_test_gdpo_chars")(lambda prompts, completions, **_: [float(len(c)) for c in completions])
    register_reward("_test_gdpo_odd")(lambda prompts, completions, **_: [float(sum(ord(ch) % 2 for ch in c))
                                                                       for c in completions])
    scorer = make_scorer(part, reward_functions=[make_reward(["_test_gdpo_chars", "_test_gdpo_odd"], [0.5, 2.0])])
    method = GRPORollouts(Roller(graphdef, CONFIG, tok, part, scorer, rcfg), lambda p: p, "gdpo", part)
    with part.activate():
        rows, _ = method.rollout(params, prompt_batch(tok, 4), jax.random.PRNGKey(5), 0)
    samples = method.samples
    terms = [np.array([s["rewards"][name] for s in samples]) for name in ("_test_gdpo_chars", "_test_gdpo_odd")]
    terms.append(-1.0 + np.array([s["finished"] for s in samples], np.float64))
    assert all(t.std() > 0 for t in terms), "every term should vary for the test to mean something"

    def in_groups(x):
        g = x.reshape(-1, 4)
        return ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)

    total = 0.5 * in_groups(terms[0]) + 2.0 * in_groups(terms[1]) + 0.7 * in_groups(terms[2])
    want = (total - total.mean()) / (total.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(np.asarray(jax.device_get(rows["advantages"])), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([s["advantage"] for s in samples], want, rtol=1e-4, atol=1e-5)


def test_held_out_evaluation_scores_each_prompts_greedy_completion_once(tok, model):
    """10 held-out prompts in batches of 8 (the second filled up with copies, not counted): the means equal those of
    one greedy Sampler call on the 10 prompts, scored by the reward function directly."""
    import types

    from jaxpost.generate.held_out import RewardEvaluator
    from jaxpost.generate.multiturn import make_eval_roller

    graphdef, params = model
    part = Partitioner()
    chars = lambda prompts, completions, **_: [float(len(c)) for c in completions]
    rcfg = RolloutConfig(max_new_tokens=N, temperature=1.0, group_size=2, stop_token_ids=tuple(range(3, 259, 4)))
    train_roller = Roller(graphdef, CONFIG, tok, part, FunctionScorer([chars]), rcfg)
    rows = [{"prompt": f"held out {i} " * (1 + i % 2)} for i in range(10)]
    eval_roller, calls = make_eval_roller(train_roller), []

    class Counting:
        terms = eval_roller.terms

        def __call__(self, *args):
            calls.append(1)
            return eval_roller(*args)

    evaluate = RewardEvaluator(Counting(), rows, tok, 16, 8, lambda p: p, lambda p: p)
    assert evaluate.keys == ("score", "rewards/<lambda>/mean", "completion_length", "missing_eos_fraction")
    with part.activate():
        got = evaluate(types.SimpleNamespace(params=params, step=3))
        assert tuple(got) == evaluate.keys
        # The evaluation reads scores only: the training forwards (old_logp, ref_logp) are not run.
        batch = next(make_prompt_pipeline(rows, tok, 16, 8, 0, num_epochs=1, shuffle=False))
        r = eval_roller(params, params, None, batch, jax.random.PRNGKey(0))
        assert "old_logp" not in r.batch and "objective/kl" not in r.metrics and "rewards/<lambda>/mean" in r.metrics
        # The run's final evaluation after the loop's at the same step: the same numbers, nothing sampled again.
        assert evaluate(types.SimpleNamespace(params=params, step=3)) == got and len(calls) == 2
        batch = next(make_prompt_pipeline(rows, tok, 16, 10, 0, num_epochs=1, shuffle=False))
        greedy = Sampler(graphdef, CONFIG, SamplingConfig(max_new_tokens=N, temperature=0.0,
                                                          stop_token_ids=rcfg.stop_token_ids))
        out = jax.device_get(greedy(params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.PRNGKey(1)))
    texts = [tok.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True)
             for row, mask in zip(out.tokens.tolist(), out.completion_mask.tolist())]
    assert len(set(texts)) > 1
    assert got["score"] == pytest.approx(np.mean(chars(None, texts)), rel=1e-6)
    assert got["rewards/<lambda>/mean"] == pytest.approx(got["score"], rel=1e-6)
    assert got["completion_length"] == pytest.approx(float(out.completion_mask.sum(-1).mean()), rel=1e-6)
    assert got["missing_eos_fraction"] == pytest.approx(float((~np.asarray(out.finished)).mean()), rel=1e-6)


def test_the_samples_log_writes_rollout_1_and_every_nth_after_it(tmp_path):
    from etils import epath

    from jaxpost.train.online import SampleLog

    log = SampleLog(epath.Path(tmp_path / "a"), 3)
    for i in range(1, 8):
        log.write(i, [{"completion": f"c{i}", "score": 0.5}, {"completion": "é", "score": -1.0}])
    log.write(10, None)  # a method that keeps no samples (on-policy distillation)
    files = sorted((tmp_path / "a" / "samples").iterdir())
    assert [f.name for f in files] == ["rollout_000001.jsonl", "rollout_000004.jsonl", "rollout_000007.jsonl"]
    assert [json.loads(line) for line in files[1].read_text(encoding="utf-8").splitlines()] == [
        {"rollout": 4, "completion": "c4", "score": 0.5}, {"rollout": 4, "completion": "é", "score": -1.0}]
    SampleLog(epath.Path(tmp_path / "b"), 0).write(1, [{"completion": "c"}])
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match=r"^OnlineConfig.samples_every must be >= 0 \(0: no samples log\), got -1\n"):
        OnlineConfig(samples_every=-1)


@pytest.mark.slow
def test_missing_eos_penalty(tok, model):
    graphdef, params = model
    part = Partitioner()
    pb = prompt_batch(tok, 8)
    greedy = Sampler(graphdef, CONFIG, SamplingConfig(max_new_tokens=N, temperature=0.0))
    out = jax.device_get(greedy(params, pb["prompt_tokens"], pb["prompt_mask"], jax.random.PRNGKey(0)))
    # A stop token that some greedy rows emit and others do not.
    counts = {t: sum(t in row for row in out.tokens.tolist()) for t in set(out.tokens.ravel().tolist())}
    stop = next(t for t, c in sorted(counts.items()) if 0 < c < len(out.tokens))
    rcfg = RolloutConfig(max_new_tokens=N, temperature=0.0, missing_eos_penalty=0.5, stop_token_ids=(stop,))
    roller = Roller(graphdef, CONFIG, tok, part, FunctionScorer(lambda prompts, completions, **_: [1.0] * len(completions)),
                    rcfg)
    with part.activate():
        r = roller(params, params, None, pb, jax.random.PRNGKey(0))
    expected_finished = np.array([stop in row for row in out.tokens.tolist()])
    np.testing.assert_array_equal(r.finished, expected_finished)
    np.testing.assert_allclose(r.scores, np.where(expected_finished, 1.0, 0.5))
    np.testing.assert_allclose(r.raw_scores, 1.0)
    assert r.metrics["rollout/missing_eos_fraction"] == pytest.approx(1 - expected_finished.mean())


def test_best_worst_pairs_skip_ties():
    s = np.array([1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0, -1.0, 4.0])
    chosen, rejected, valid = best_worst_pairs(s, 3)
    np.testing.assert_array_equal(chosen, [1, 3, 8])
    np.testing.assert_array_equal(rejected, [0, 3, 7])
    np.testing.assert_array_equal(valid, [True, False, True])
    host = {k: np.arange(9 * 2).reshape(9, 2) * (i + 1) for i, k in
            enumerate(("tokens", "positions", "segment_ids", "targets", "loss_mask"))}
    b = pair_batch(host, chosen, rejected, valid)
    np.testing.assert_array_equal(b["chosen_tokens"], host["tokens"][[1, 3, 8]])
    np.testing.assert_array_equal(b["rejected_loss_mask"], host["loss_mask"][[0, 3, 7]])
    np.testing.assert_array_equal(b["pair_mask"], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="group_size=4"):
        best_worst_pairs(s, 4)


def test_minibatch_orders_are_permutations_and_resume_stable():
    a = minibatch_orders(16, 4, 2, seed=1, rollout=7)
    assert len(a) == 8
    for e in range(2):
        np.testing.assert_array_equal(np.sort(np.concatenate(a[4 * e:4 * e + 4])), np.arange(16))
    assert not np.array_equal(np.concatenate(a[:4]), np.concatenate(a[4:]))
    for x, y in zip(a, minibatch_orders(16, 4, 2, seed=1, rollout=7)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="minibatch_size=5"):
        minibatch_orders(16, 5, 1, 0, 0)


def test_ppo_advantages_by_hand():
    # kl = [., 0.1, 0.2], kl_coef 0.5 -> rewards [0, -0.05, -0.1 + 1]; gamma = lam = 1:
    # A_2 = 0.9 - 0.4 = 0.5; A_1 = (-0.05 + 0.4 - 0.3) + 0.5 = 0.55; returns = A + V.
    mask = jnp.array([[0.0, 1.0, 1.0]])
    adv, ret, m = ppo_advantages(jnp.array([[0.0, -1.0, -2.0]]), jnp.array([[0.0, -1.1, -2.2]]),
                                 jnp.array([[0.0, 0.3, 0.4]]), jnp.array([1.0]), mask, 0.5, gamma=1.0, lam=1.0,
                                 whiten_advantages=False)
    np.testing.assert_allclose(adv, [[0.0, 0.55, 0.5]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 0.85, 0.9]], atol=1e-6)
    assert float(m["objective/kl"]) == pytest.approx(0.3)
    assert float(m["objective/rlhf_reward"]) == pytest.approx(1.0 - 0.15)
    adv_w, _, _ = ppo_advantages(jnp.array([[0.0, -1.0, -2.0]]), jnp.array([[0.0, -1.1, -2.2]]),
                                 jnp.array([[0.0, 0.3, 0.4]]), jnp.array([1.0]), mask, 0.5, gamma=1.0, lam=1.0)
    # Whitened over the two masked entries: mean 0.525, unbiased std 0.0354 -> +-0.7071.
    np.testing.assert_allclose(adv_w, [[0.0, 0.7071, -0.7071]], atol=1e-3)


@pytest.mark.slow
def test_ppo_loss_at_old_policy_and_gradients_reach_both_models(tok, model):
    graphdef, policy = model
    v_config = CONFIG.replace(head="score")
    v_graphdef, value = create(v_config, seed=4)
    pb = prompt_batch(tok, 2)
    rng = np.random.default_rng(0)
    comp = rng.integers(10, 200, (2, 4)).astype(np.int32)
    host = rollout_sequences(pb["prompt_tokens"], pb["prompt_mask"], comp, np.ones((2, 4), np.float32), 0)
    measured = jax.jit(make_rollout_logprobs(graphdef, CONFIG, v_graphdef))(policy, policy, value, host)
    mask = host["loss_mask"]
    adv = rng.normal(size=mask.shape).astype(np.float32) * mask
    ret = rng.normal(size=mask.shape).astype(np.float32) * mask
    batch = {**host, "old_logp": measured["old_logp"], "old_values": measured["old_values"], "advantages": adv,
             "returns": ret}
    loss_fn = make_ppo_loss(graphdef, CONFIG, v_graphdef, vf_coef=0.3)
    params = {"policy": policy, "value": value}
    (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)  # eager is minutes
    # Independent value forward: the score head at every position.
    hidden, _ = jax.jit(forward, static_argnums=0)(v_graphdef, value, host["tokens"], host["positions"], host["segment_ids"])
    v = np.asarray(scores(value, hidden))
    n = mask.sum()
    expected = -(adv * mask).sum() / n + 0.3 * 0.5 * (((v - ret) ** 2) * mask).sum() / n
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(m["policy/approxkl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(m["policy/clipfrac"]) == 0.0 and float(m["val/clipfrac"]) == 0.0
    for part in ("policy", "value"):
        assert float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads[part])))) > 0
    with pytest.raises(KeyError, match="returns"):
        loss_fn(params, {k: v for k, v in batch.items() if k != "returns"})


class CountingRollouts(Stateless):
    """A fake online method: rollout ``i`` gives 16 rows ``x = i + row / 16`` (NaN from ``nan_at`` on)."""

    def __init__(self, part, nan_at=None):
        self.part, self.nan_at, self.seen = part, nan_at, []

    def rollout(self, params, prompts, rng, index):
        self.seen.append((index, float(jax.device_get(params["w"]).sum())))
        x = np.full((16, 8), index, np.float32) + np.arange(16, dtype=np.float32)[:, None] / 16
        if self.nan_at is not None and index >= self.nan_at:
            x[:] = np.nan
        return on_mesh({"x": x}, self.part), {"objective/scores": float(index)}


class Counter:
    """A checkpointable prompt iterator yielding its position."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"i": self.i - 1}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _linear_loss(p, batch, frozen=None):
    return jnp.mean(p["w"] * batch["x"]), {}


def test_rollout_batches_minibatches_state_and_boundaries():
    part = Partitioner()
    method = CountingRollouts(part)
    batches = RolloutBatches(method, Counter(), part, rows=16, minibatch_size=8, epochs=2, seed=5)
    assert batches.updates_per_rollout == 4

    class State:
        params = {"w": jnp.ones((8,))}

    got = [np.asarray(batches.next_for(State)["x"])[:, 0] for _ in range(4)]
    orders = minibatch_orders(16, 8, 2, 5, 0)
    for g, idx in zip(got, orders):
        np.testing.assert_allclose(g, idx / 16)  # rollout 0's rows, in the (seed, rollout) order
    assert batches.get_state() == {"prompts": {"i": 1}, "rollout": 1, "method": {}}
    batches.next_for(State)
    with pytest.raises(RuntimeError, match="rollout boundaries"):
        batches.get_state()
    assert batches.metrics()["rollout"] == 2 and batches.metrics()["objective/scores"] == 1.0
    batches.set_state({"prompts": {"i": 1}, "rollout": 1, "method": {}})
    np.testing.assert_allclose(np.asarray(batches.next_for(State)["x"])[:, 0], 1 + minibatch_orders(16, 8, 2, 5, 1)[0] / 16)
    with pytest.raises(ValueError, match="must divide"):
        RolloutBatches(method, Counter(), part, rows=16, minibatch_size=3)
    with pytest.raises(ValueError, match="batch shards"):
        RolloutBatches(method, Counter(), part, rows=16, minibatch_size=4)


def test_online_run_guards_nan_saves_at_rollouts_and_resumes(tmp_path):
    part = Partitioner()
    params = {"w": jnp.ones((8,))}
    shardings = {"w": part.replicated}
    online = OnlineConfig(num_rollouts=4, save_every=1, progress=False)

    def run(method, name):
        batches = RolloutBatches(method, Counter(), part, rows=16, minibatch_size=8, seed=0)
        with part.activate():
            return fit_online(run_dir=tmp_path / name, loss_fn=_linear_loss, params=params, param_shardings=shardings,
                              partitioner=part, batches=batches, online=online, summary={})

    straight = run(CountingRollouts(part), "straight")
    with pytest.raises(NonFiniteLossError, match="step 5"):  # rollout 2's first update (2 updates per rollout)
        run(CountingRollouts(part, nan_at=2), "resumed")
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    method = CountingRollouts(part)
    resumed = run(method, "resumed")
    assert [i for i, _ in method.seen] == [2, 3]  # resumed at the rollout after the last checkpoint
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(straight.params["w"]))
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [(r["rollout"], r["step"]) for r in rows] == [(1, 2), (2, 4), (3, 6), (4, 8)]


def test_rollout_overlap_benchmark_runs_tiny():
    """benchmarks/rollout_overlap.py end to end on a tiny model (its harness and arithmetic, not its speed)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import rollout_overlap

    report = rollout_overlap.main(["--vocab", "96", "--hidden", "32", "--intermediate", "64", "--layers", "2",
                                   "--prompts", "4", "--prompt-len", "6", "--new", "8", "--updates", "2",
                                   "--repeats", "3", "--judge-ms", "5", "--group-size", "2"])
    times = report["times_s"]
    assert set(times) == {"sample", "update", "sequential", "dispatch_ahead", "thread"}
    assert all(len(v) == 3 and min(v) > 0 for v in times.values())
    for name in ("dispatch_ahead", "thread"):
        per_round = sorted(t / s for t, s in zip(times[name], times["sequential"]))
        assert report["paired_over_sequential"][name] == pytest.approx(per_round[1])
    assert report["paired_over_sequential"]["sequential"] == 1.0
    assert report["args"]["vocab"] == 96  # the second part's byte-tokenizer model leaves the first part's alone
    for reward in ("judge", "busy"):
        part = report["scoring"][reward]
        assert all(len(v) == 3 and min(v) > 0.005 for v in part["times_s"].values())  # each rollout scored (5 ms)
        assert part["score_s"] >= 0.005 and part["measure_s"] > 0
        per_round = sorted(x / y for x, y in zip(part["times_s"]["roller"], part["times_s"]["measure_first"]))
        assert part["paired_roller_over_measure_first"] == pytest.approx(per_round[1])


def test_an_online_best_metric_the_evaluation_does_not_log_is_refused_before_sampling(tmp_path):
    class Evaluate:  # what RewardEvaluator.keys holds for a run scored by one reward function, `exact`
        keys = ("score", "rewards/exact/mean", "completion_length", "missing_eos_fraction")

        def __call__(self, state):
            raise AssertionError("nothing is evaluated before the check")

    online = OnlineConfig(eval_every=2, best_metric="eval/rewards/exactt/mean")
    with pytest.raises(UserError, match=r"OnlineConfig.best_metric='eval/rewards/exactt/mean' is not among this "
                                        r"run's evaluation metrics \['eval/completion_length', "
                                        r"'eval/missing_eos_fraction', 'eval/rewards/exact/mean', 'eval/score'\]"):
        fit_online(run_dir=tmp_path, loss_fn=None, params=None, param_shardings=None, partitioner=None, batches=None,
                   online=online, evaluate=Evaluate())
    with pytest.raises(UserError, match="evaluates held-out prompts, but this run has no evaluate"):
        fit_online(run_dir=tmp_path, loss_fn=None, params=None, param_shardings=None, partitioner=None, batches=None,
                   online=online, evaluate=None)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="OnlineConfig.patience must be >= 0"):
        OnlineConfig(patience=-1)


def grpo_batch_with_full_logits(model):
    """A 4-row GRPO batch of a tiny model, and its log-probs and entropies from the full logits (float64)."""
    from jaxpost.models import logits

    graphdef, params = model
    rng = np.random.default_rng(0)
    B, L = 4, 12
    tokens = rng.integers(3, CONFIG.vocab_size, (B, L)).astype(np.int32)
    mask = np.zeros((B, L), np.float32)
    for b, (start, end) in enumerate([(3, 11), (5, 9), (2, 12), (4, 8)]):
        mask[b, start:end] = 1.0
    batch = {"tokens": tokens, "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, L), np.int32), "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask}
    hidden, _ = forward(graphdef, params, tokens, batch["positions"], batch["segment_ids"])
    log_p = np.asarray(jax.nn.log_softmax(logits(params, CONFIG, hidden).astype(jnp.float32), -1), np.float64)
    logp = np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
    entropy = -(np.exp(log_p) * log_p).sum(-1)
    old = logp + rng.normal(0, 0.3, (B, L))
    batch.update(old_logp=(old * mask).astype(np.float32), ref_logp=(logp * mask).astype(np.float32),
                 advantages=np.array([1.0, -0.5, 2.0, -1.5], np.float32))
    return batch, logp, old, entropy, mask


def test_grpo_top_entropy_quantile_trains_only_the_high_entropy_tokens(model):
    """make_grpo_loss(top_entropy_quantile=0.25) against the loss written out from the model's full logits."""
    from jaxpost.algorithms.online import make_grpo_loss

    graphdef, params = model
    batch, logp, old, entropy, mask = grpo_batch_with_full_logits(model)
    # The top quarter of the 26 completion tokens by entropy: at or above the 0.75 quantile (linear interpolation).
    keep = (mask > 0) & (entropy >= np.quantile(entropy[mask > 0], 0.75))
    ratio = np.exp(logp - old)
    adv = batch["advantages"][:, None]
    surrogate = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    want = (surrogate * keep).sum() / mask.sum()

    loss, metrics = make_grpo_loss(graphdef, CONFIG, aggregation="token", top_entropy_quantile=0.25)(params, batch)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["policy/entropy_kept_fraction"]) == pytest.approx(keep.sum() / mask.sum())
    assert 5 <= keep.sum() <= 8
    every = make_grpo_loss(graphdef, CONFIG, aggregation="token")(params, batch)[0]
    assert float(every) == pytest.approx((surrogate * mask).sum() / mask.sum(), rel=1e-4) and abs(every - loss) > 1e-3


def test_grpo_entropy_bonus_on_the_entropy_masks_tokens_value_and_gradient(model):
    """make_grpo_loss(entropy_coef=0.1, top_entropy_quantile=0.5): loss = policy term - 0.1 * mean entropy over the
    tokens the entropy mask keeps (TRL's effective mask), against the same loss written out in jnp from the full
    logits (entropy -sum p log p); values and gradients."""
    from jaxpost.algorithms.online import make_grpo_loss
    from jaxpost.models import logits

    graphdef, params = model
    batch, logp64, old, entropy64, mask = grpo_batch_with_full_logits(model)
    keep = (mask > 0) & (entropy64 >= np.quantile(entropy64[mask > 0], 0.5))
    adv = jnp.asarray(batch["advantages"])[:, None]

    def written_out(p):
        hidden, _ = forward(graphdef, p, batch["tokens"], batch["positions"], batch["segment_ids"])
        log_p = jax.nn.log_softmax(logits(p, CONFIG, hidden).astype(jnp.float32), -1)
        lp = jnp.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
        ent = -(jnp.exp(log_p) * log_p).sum(-1)
        ratio = jnp.exp(lp - batch["old_logp"])
        policy = (-jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv) * keep).sum() / mask.sum()
        return policy - 0.1 * (ent * keep).sum() / keep.sum()

    fn = make_grpo_loss(graphdef, CONFIG, aggregation="token", top_entropy_quantile=0.5, entropy_coef=0.1)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params, batch)
    want, want_grads = jax.value_and_grad(written_out)(params)
    assert float(loss) == pytest.approx(float(want), rel=1e-4) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    assert float(metrics["policy/entropy"]) == pytest.approx(float((entropy64 * keep).sum() / keep.sum()), rel=1e-4)
    assert float(metrics["policy_loss"]) == pytest.approx(float(loss) + 0.1 * float(metrics["policy/entropy"]),
                                                          rel=1e-5)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-6)
    plain = make_grpo_loss(graphdef, CONFIG, aggregation="token", top_entropy_quantile=0.5)
    assert abs(float(plain(params, batch)[0]) - float(metrics["policy_loss"])) < 1e-6


def test_grpo_cispo_with_the_off_policy_mask_and_kl_correction(model):
    """make_grpo_loss(surrogate='cispo', off_policy_mask_threshold, kl_ratio_correction) against the loss written
    out from the model's full logits: weights min(r, 1.1), the A < 0 rows whose mean (old - logp) > 0.05 dropped."""
    from jaxpost.algorithms.online import make_grpo_loss

    graphdef, params = model
    batch, logp, old, _, mask = grpo_batch_with_full_logits(model)
    adv = batch["advantages"][:, None].astype(np.float64)
    gap = ((old - logp) * mask).sum(1, keepdims=True) / mask.sum(1, keepdims=True)
    keep = (adv >= 0) | (gap <= 0.05)
    ratio = np.exp(logp - old)
    d = logp * 0  # ref_logp = logp: the KL term is 0 in value (its gradient is what the correction changes)
    want = ((-np.minimum(ratio, 1.1) * adv * logp * keep + 0.1 * (np.expm1(d) - d) * ratio) * mask).sum() / mask.sum()

    loss, metrics = make_grpo_loss(graphdef, CONFIG, aggregation="token", surrogate="cispo", cispo_max_ratio=1.1,
                                   off_policy_mask_threshold=0.05, beta=0.1, kl_ratio_correction=True)(params, batch)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["policy/off_policy_masked_fraction"]) == pytest.approx(1 - keep.mean())
    assert 0 < keep.sum() < 4, "the example should drop some rows and keep others"
    assert float(metrics["cispo_clip_ratio"]) == pytest.approx(
        (((ratio > 1.1) & (adv > 0)) * mask).sum() / mask.sum(), abs=1e-6)


def test_grpo_vespo_weights_summed_per_sequence_luspo(model):
    """make_grpo_loss(surrogate='vespo', aggregation='luspo', vespo_* keys) against the loss written out from the
    model's full logits: phi = exp(lam + k log w - lam w) of each row's summed log-ratio, each row's terms summed."""
    from jaxpost.algorithms.online import make_grpo_loss

    graphdef, params = model
    batch, logp, old, _, mask = grpo_batch_with_full_logits(model)
    adv = batch["advantages"][:, None].astype(np.float64)
    log_w = np.clip(((logp - old) * mask).sum(1, keepdims=True), np.log(1e-8), 20.0)
    k, lam = np.where(adv >= 0, 1.5, 2.5), np.where(adv >= 0, 2.0, 4.0)
    phi = np.exp(lam + k * log_w - lam * np.exp(log_w))
    want = ((-phi * adv * logp) * mask).sum(1).mean()
    loss, metrics = make_grpo_loss(graphdef, CONFIG, aggregation="luspo", surrogate="vespo", vespo_k_pos=1.5,
                                   vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=4.0)(params, batch)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["vespo/phi_seq_mean"]) == pytest.approx((phi * mask).sum() / mask.sum(), rel=1e-4)
    assert np.ptp(phi[mask.sum(1) > 0]) > 0.05, "the example should weigh its rows differently"
