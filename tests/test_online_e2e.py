"""Online runs end to end: crash + resume gives identical results, PPO against a trained reward model, the best
evaluated policy kept and exported, gin files."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxpost import config as jp_config
from jaxpost.models import forward
from jaxpost.models.heads import scores as score_head
from jaxpost.models.load import load_model
from jaxpost.train import Checkpointer
from jaxpost.train.fit import LoopConfig
from jaxpost.recipes.grpo import grpo
from jaxpost.train.online import OnlineConfig
from jaxpost.recipes.ppo import ppo
from jaxpost.recipes.reward import reward_model
from jaxpost.generate.rollout import RolloutConfig, rollout_sequences
from jaxpost.generate.scorers import RewardModelScorer
from jaxpost.sharding import Partitioner
from online_helpers import CONFIG, data, gin_scope, lowercase_fraction, scores_and_kl  # noqa: F401

CRASH = {"at": None, "calls": 0}


def crashing_reward(prompts, completions, **kw):
    """The toy reward, raising on call number ``CRASH["at"]`` (simulates a killed run)."""
    CRASH["calls"] += 1
    if CRASH["at"] is not None and CRASH["calls"] == CRASH["at"]:
        raise RuntimeError("simulated crash")
    return lowercase_fraction(prompts, completions)


def _grpo(data, name):
    return grpo(run_dir=str(data / name), train_data=str(data / "prompts.jsonl"), tokenizer=str(data / "tok"),
                model=CONFIG, rollout=RolloutConfig(max_new_tokens=6, group_size=2), num_iterations=2,
                minibatch_size=8, online=OnlineConfig(num_rollouts=4, prompts_per_rollout=8, max_prompt_len=16,
                                                      save_every=2, samples_every=1))


@pytest.mark.slow
def test_resume_continues_from_the_same_rollout(gin_scope, data):
    gin_scope.bind_parameter("make_scorer.reward_functions", [crashing_reward])
    gin_scope.bind_parameter("make_optimizer.learning_rate", 1e-2)
    CRASH.update(at=None, calls=0)
    _grpo(data, "straight")
    CRASH.update(at=4, calls=0)  # dies in rollout 4: rollout 3 was trained on and logged, not saved
    with pytest.raises(RuntimeError, match="simulated crash"):
        _grpo(data, "resumed")
    assert sorted(p.name for p in (data / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == ["8"]  # step 8 = rollout 2
    assert sorted(p.name for p in (data / "resumed" / "samples").iterdir()) == [f"rollout_00000{i}.jsonl" for i in (1, 2, 3)]
    CRASH.update(at=None, calls=0)
    summary = _grpo(data, "resumed")
    assert CRASH["calls"] == 2 and summary["rollout"] == 4 and summary["step"] == 4 * 2 * 2
    _, _, straight = scores_and_kl(data / "straight")
    _, _, resumed = scores_and_kl(data / "resumed")
    # One record per rollout (logged at its last update), the rollout number beside the optimizer step.
    assert [(r["rollout"], r["step"]) for r in resumed] == [(1, 4), (2, 8), (3, 12), (4, 16)]
    for a, b in zip(straight[2:], resumed[2:]):
        for k in a:
            if not k.startswith(("time/", "rollout/tokens_per_s", "steps_per_s", "tokens_per_s")):
                assert a[k] == b[k], (k, a[k], b[k])
    pa, pb = load_file(data / "straight/final/model.safetensors"), load_file(data / "resumed/final/model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # The samples log: every completion of each rollout, the resumed run's rollout 3 sampled and written again.
    logs = {name: sorted((data / name / "samples").iterdir()) for name in ("straight", "resumed")}
    assert [p.name for p in logs["resumed"]] == [f"rollout_00000{i}.jsonl" for i in (1, 2, 3, 4)]
    for a, b in zip(logs["straight"], logs["resumed"], strict=True):
        assert a.read_text() == b.read_text()
    records = [json.loads(line) for line in logs["straight"][3].read_text().splitlines()]
    assert len(records) == 8 * 2 and {r["rollout"] for r in records} == {4}
    # No missing-EOS penalty: a score is the one reward's value.
    assert [r["score"] for r in records] == pytest.approx([r["rewards"]["crashing_reward"] for r in records])
    assert np.mean([r["score"] for r in records]) == pytest.approx(straight[3]["objective/scores"], rel=1e-5)
    assert all(r["completion_tokens"] >= 1 and isinstance(r["completion"], str) for r in records)


@pytest.mark.slow
def test_ppo_with_trained_reward_model(gin_scope, data):
    with open(data / "prefs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Q{i}: say", "chosen": "abc def", "rejected": "XYZ 123"}) + "\n")
    gin_scope.bind_parameter("make_optimizer.learning_rate", 3e-3)
    reward_model(run_dir=str(data / "rm"), train_data=str(data / "prefs.jsonl"), tokenizer=str(data / "tok"),
                 model=CONFIG, seq_len=32, batch_size=8, loop=LoopConfig(num_steps=3, progress=False))
    rm_dir = str(data / "rm" / "final")

    # The scorer reads the score head at the last real token; check against an unpadded forward.
    part = Partitioner()
    scorer = RewardModelScorer(rm_dir, part, policy_vocab_size=CONFIG.vocab_size)
    host = rollout_sequences(np.array([[0, 0, 5, 6], [7, 8, 9, 10]] * 4), np.array([[0, 0, 1, 1], [1, 1, 1, 1]] * 4),
                             np.array([[11, 12, 0], [13, 0, 0]] * 4), np.array([[1, 1, 0], [1, 0, 0]] * 4), 0)

    class R:
        batch = host

    got = scorer(R)
    _, graphdef, params = load_model(None, rm_dir, part, head="score")
    for row, ids in ((0, [5, 6, 11, 12]), (1, [7, 8, 9, 10, 13])):
        t = np.array([ids], np.int32)
        h, _ = forward(graphdef, params, t, np.arange(len(ids), dtype=np.int32)[None], np.ones_like(t))
        np.testing.assert_allclose(got[row], np.asarray(score_head(params, h))[0, -1], atol=1e-5)

    gin_scope.bind_parameter("make_scorer.reward_model", rm_dir)
    summary = ppo(run_dir=str(data / "ppo_rm"), train_data=str(data / "prompts.jsonl"), tokenizer=str(data / "tok"),
                  model=CONFIG, value_from=rm_dir, rollout=RolloutConfig(max_new_tokens=6, missing_eos_penalty=1.0),
                  online=OnlineConfig(num_rollouts=2, prompts_per_rollout=8, max_prompt_len=16),
                  ppo_epochs=2, minibatch_size=8, kl_coef=0.2, kl_target=0.01, kl_horizon=100.0)
    _, _, rows = scores_and_kl(data / "ppo_rm")
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "rollout/tokens_per_s",
                "time/generate_fraction"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert 0 < rows[0]["time/generate_fraction"] < 1
    # Adaptive KL: coef_2 = coef_1 * (1 + clip(kl_1 / target - 1, -0.2, 0.2) * n / horizon), n = 8 completions.
    err = np.clip(rows[0]["objective/kl"] / 0.01 - 1, -0.2, 0.2)
    assert rows[1]["objective/kl_coef"] == pytest.approx(0.2 * (1 + err * 8 / 100.0), rel=1e-6)
    assert summary["step"] == 2 * 2 and (data / "ppo_rm" / "value" / "config.json").exists()


@pytest.mark.slow
def test_the_best_evaluated_policy_stops_the_run_and_is_exported(gin_scope, data):
    """OnlineConfig.best_metric / patience / export_best: held-out greedy scores pick the state run_dir/final holds."""
    with open(data / "held_out.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"E{i}: tell"}) + "\n")
    gin_scope.bind_parameter("make_scorer.reward_functions", [lowercase_fraction])
    gin_scope.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin_scope.bind_parameter("make_optimizer.schedule", "constant")

    def run():
        return grpo(run_dir=str(data / "best"), train_data=str(data / "prompts.jsonl"), tokenizer=str(data / "tok"),
                    model=CONFIG, rollout=RolloutConfig(max_new_tokens=6, group_size=2), minibatch_size=8,
                    eval_data=str(data / "held_out.jsonl"),
                    online=OnlineConfig(num_rollouts=5, prompts_per_rollout=4, max_prompt_len=16, eval_every=1,
                                        best_metric="eval/score", export_best=True, patience=1, min_delta=1e-3,
                                        progress=False))

    summary = run()
    records = [json.loads(line) for line in (data / "best" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/score"] for r in records if "eval/score" in r}
    # Rollout 2 scored lower than rollout 1 (else the test could not tell the best from the last): patience 1 stops.
    assert list(evals) == [1, 2] and evals[2] < evals[1], evals
    assert (summary["stopped_early"], summary["rollout"], summary["best/step"], summary["step"]) == (True, 2, 1, 1)
    assert summary["best/value"] == evals[1]
    assert "eval/score has not improved by more than 0.001" in summary["stop_reason"]  # min_delta reaches the loop
    assert Checkpointer(data / "best" / "checkpoints_best").all_steps() == [1]
    assert Checkpointer(data / "best" / "checkpoints").all_steps() == [2]  # the last state stays for resuming
    # The final evaluation samples again from the restored state (the evaluator last saw step 2): rollout 1's score.
    assert summary["eval/score"] == pytest.approx(evals[1], rel=1e-6)
    first = load_file(data / "best" / "final" / "model.safetensors")
    again = run()  # the rerun finds the run stopped early, stops at once and exports the same best state
    assert (again["stopped_early"], again["best/step"], again["step"]) == (True, 1, 1)
    assert again["eval/score"] == pytest.approx(evals[1], rel=1e-6)
    assert len([line for line in (data / "best" / "metrics.jsonl").read_text().splitlines()]) == len(records)
    for k, v in load_file(data / "best" / "final" / "model.safetensors").items():
        np.testing.assert_array_equal(v, first[k], err_msg=k)


@pytest.mark.parametrize("name,task", [("ppo", "ppo"), ("grpo", "grpo"), ("rloo", "grpo"),
                                       ("online_dpo", "online_dpo")])
def test_algorithm_gin_files_parse(gin_scope, name, task):
    import jaxpost.cli  # noqa: F401  (registers run)
    jp_config.parse([f"algorithms/{name}.gin"], finalize=False)
    assert gin_scope.query_parameter("run.task").selector.endswith(task)
    if name == "rloo":
        assert gin_scope.query_parameter("grpo.advantage") == "rloo"
