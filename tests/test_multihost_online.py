"""Online runs over 2 processes x 4 CPU devices equal 1 process x 8 devices (gloo collectives).

GRPO (Python reward functions: each process scores its own rows), PPO (a
reward model on the mesh) and online DPO run through ``jaxpost train``'s
code path in both layouts from the same command. Prompts are the same
global batch on every host, sampling keys are per global row, and every
statistic is computed from gathered values, so the sampled tokens, the
rewards, the losses and the exported weights must agree (to float32
round-off of cross-process sums). A GRPO checkpoint written by 2 processes
resumes in 1 process exactly as the uninterrupted 1-process run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest

from pipeline_utils import make_task
from test_multihost import Job, _assert_same_weights, _env, _records, _wait, REPO

WORKER = str(REPO / "tests" / "multihost_online_worker.py")
EXPERIMENT = "configs/experiments/local_multihost_grpo.gin"
TIMEOUT_S = 480

pytestmark = pytest.mark.slow


def _jobs(task: dict, root: Path, rm_dir: Path, grpo_rollouts: int, names: list[str]) -> str:
    """The worker's job list: ``names`` are methods, or ``method:run_name`` to use another run directory."""
    extra = {
        "grpo": [f"--gin.OnlineConfig.num_rollouts={grpo_rollouts}"],
        "ppo": ["--gin.OnlineConfig.num_rollouts=2", "--gin.make_scorer.reward_functions=None",
                f"--gin.make_scorer.reward_model='{rm_dir}'", f"--gin.ppo.value_from='{rm_dir}'",
                "--gin.ppo.ppo_epochs=2", "--gin.ppo.minibatch_size=8", "--gin.RolloutConfig.group_size=1",
                "--gin.OnlineConfig.prompts_per_rollout=16"],
        "online_dpo": ["--gin.OnlineConfig.num_rollouts=2", "--gin.OnlineConfig.prompts_per_rollout=8"],
    }
    jobs = []
    for entry in names:
        method, run_name = (entry.split(":") + [entry])[:2]
        jobs.append({"name": run_name, "args": [
            f"--gin_file={EXPERIMENT}", f"--gin.run.task=@{method}", f"--gin.{method}.model=@ModelConfig()",
            f"--gin.{method}.train_data='{task['prompts']}'", f"--gin.{method}.tokenizer='{task['tokenizer']}'",
            f"--gin.{method}.run_dir='{root / run_name}'", *extra[method]]})
    return json.dumps(jobs)


def _worker(name: str, root: Path, spec: str, processes: int) -> list[Job]:
    if processes == 1:
        return [Job(name, [sys.executable, WORKER, str(root), spec], _env(8), root / f"{name}.log")]
    port = portpicker.pick_unused_port()
    return [Job(f"{name}[process {i}]", [sys.executable, WORKER, str(root), spec],
                _env(4, JAXPOST_COORDINATOR=f"127.0.0.1:{port}", JAXPOST_NUM_PROCESSES="2",
                     JAXPOST_PROCESS_ID=str(i)), root / f"{name}_{i}.log") for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jaxpost.data import build_tokenizer
    from jaxpost.models import ModelConfig, create
    from jaxpost.models.export import export

    root = tmp_path_factory.mktemp("multihost_online")
    task = make_task(root, n_sft=8, n_pref=8, n_prompts=32, n_eval=8)
    # A random reward model with the policy's tokenizer (PPO scores on the devices, values start from it).
    config = ModelConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head="score")
    graphdef, params = create(config, seed=7)
    export(root / "rm", config, params, build_tokenizer(None, vocab_size=261))
    rm_dir = root / "rm" / "final"
    two = root / "two"
    one = root / "one"
    two.mkdir(), one.mkdir()
    jobs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        jobs += _worker("two", two, _jobs(task, two, rm_dir, 2, ["grpo", "ppo", "online_dpo"]), 2)
        jobs += _worker("one", one, _jobs(task, one, rm_dir, 3, ["grpo", "ppo", "online_dpo"]), 1)
        _wait(jobs, deadline)
        # The 2-process GRPO run stopped after rollout 2 with a checkpoint; one process takes it to rollout 3.
        shutil.copytree(two / "grpo", one / "grpo_resumed")
        resume = _worker("resume", one, _jobs(task, one, rm_dir, 3, ["grpo:grpo_resumed"]), 1)
        jobs += resume
        _wait(resume, deadline)
    finally:
        for job in jobs:
            job.kill()
    return {"two": two, "one": one}


def _tokens(run_root: Path, name: str, process: int) -> list[np.ndarray]:
    with np.load(run_root / f"{name}_{process}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.parametrize("name", ["grpo", "ppo", "online_dpo"])
def test_two_processes_sample_and_train_like_one(runs, name):
    two, one = runs["two"], runs["one"]
    t0, t1, ref = _tokens(two, name, 0), _tokens(two, name, 1), _tokens(one, name, 0)
    assert len(t0) == 2 and len(ref) >= 2
    for a, b, c in zip(t0, t1, ref):
        np.testing.assert_array_equal(a, b)  # every process holds the whole rollout
        np.testing.assert_array_equal(a, c)  # and it is the 1-process rollout
    a, b = _records(two / name), _records(one / name)
    assert [r["rollout"] for r in a] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ("objective/scores", "objective/kl", "rollout/completion_length", "loss", "grad_norm",
                    "loss/policy", "loss/value", "objective/kl_coef", "pairs/valid_fraction"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=2e-5, abs=1e-6), (name, ra["step"], key)
    if name != "grpo":  # the 1-process GRPO run goes on to rollout 3 (see the resume test)
        _assert_same_weights(two / name, one / name)
    info = [json.loads((two / f"{name}_{i}.json").read_text()) for i in range(2)]
    assert [(i["process_count"], i["device_count"]) for i in info] == [(2, 8), (2, 8)]


def test_checkpoint_of_two_processes_resumes_in_one_process_identically(runs):
    one = runs["one"]
    resumed, straight = _records(one / "grpo_resumed"), _records(one / "grpo")
    assert [r["rollout"] for r in resumed] == [1, 2, 3]  # rollouts 1-2 written by the 2-process run
    assert _tokens(one, "grpo_resumed", 0)[0].tolist() == _tokens(one, "grpo", 0)[2].tolist()
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=2e-5, abs=1e-6)
    _assert_same_weights(one / "grpo_resumed", one / "grpo")
