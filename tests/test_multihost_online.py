"""Online runs over 2 processes x 4 CPU devices equal 1 process x 8 devices (gloo collectives).

GRPO (Python reward functions, each process scoring its own rows, plus a
reward model on the mesh; GDPO advantages, the off-policy sequence mask and
an entropy bonus), PPO (a reward model) and online DPO run through ``jaxpost train``'s
code path in both layouts from the same command. Prompts are the same
global batch on every host, sampling keys are per global row, and every
statistic is computed from gathered values, so the sampled tokens, the
rewards, the losses and the exported weights must agree (to float32
round-off of cross-process sums). A GRPO checkpoint written by 2 processes
resumes in 1 process exactly as the uninterrupted 1-process run.

The 2-process online DPO run's sampler compacts (``Sampler.compact``: rows that
stopped are dropped between decode phases, as every host decides from the
same replicated counts), the 1-process one's does not, and they must agree;
both sample with a repetition penalty, whose per-row context the compacting
regroups carry across hosts.

Every run uses the experiment's FSDP mesh (fsdp=8); PPO also runs under the
``fsdp_tp`` preset (configs/mesh/fsdp_tp.gin: fsdp=4 x tensor=2, heads, MLP
and vocab split over ``tensor``), with the policy, reference, value model and
reward model all on that mesh, and must agree the same way. (GRPO under
``fsdp_tp`` would put only the policy and reference there: a subset of PPO's.)
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

from jaxpost.train import Checkpointer
from pipeline_utils import make_task
from test_multihost import Job, _assert_same_weights, _env, _records, _wait, REPO

WORKER = str(REPO / "tests" / "multihost_online_worker.py")
EXPERIMENT = "configs/experiments/local_multihost_grpo.gin"
TIMEOUT_S = 480

pytestmark = pytest.mark.slow


TP = "fsdp_tp"  # configs/mesh/fsdp_tp.gin
LAYOUTS = {  # the mesh and the first q_proj kernel's spec ([embed, heads]) each mesh preset gives on 8 devices
    None: {"mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "q_proj": ["fsdp", None]},
    TP: {"mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "q_proj": ["fsdp", "tensor"]},
}


def _job(task: dict, root: Path, rm_dir: Path, method: str, name: str | None = None, *,
         grpo_rollouts: int = 2, mesh: str | None = None, compact: bool = False) -> dict:
    """One worker job: ``method`` run in ``root / name`` (default: ``method``, or ``method_mesh`` with a
    ``mesh``, a configs/mesh preset that replaces the experiment's FSDP mesh); ``compact``: its sampler
    drops stopped rows (``Sampler.compact``)."""
    extra = {
        # Its Python rewards (each process scores its own rows) plus a reward model on the mesh, summed.
        "grpo": [f"--gin.OnlineConfig.num_rollouts={grpo_rollouts}", f"--gin.make_scorer.reward_model='{rm_dir}'",
                 "--gin.make_scorer.reward_model_weight=0.5", f"--gin.grpo.eval_data='{task['prompts']}'",
                 "--gin.OnlineConfig.eval_every=1",  # held-out rewards too, every rollout, and the best state by them
                 "--gin.OnlineConfig.best_metric='eval/score'",
                 # GDPO normalises each term (both sources) over the gathered rollout; the off-policy mask and the
                 # entropy bonus are reductions over the global batch inside the sharded step.
                 "--gin.grpo.advantage='gdpo'", "--gin.make_grpo_loss.off_policy_mask_threshold=0.01",
                 "--gin.make_grpo_loss.entropy_coef=0.01"],
        "ppo": ["--gin.OnlineConfig.num_rollouts=2", "--gin.make_scorer.reward_functions=None",
                f"--gin.make_scorer.reward_model='{rm_dir}'", f"--gin.ppo.value_from='{rm_dir}'",
                "--gin.ppo.ppo_epochs=2", "--gin.ppo.minibatch_size=8", "--gin.RolloutConfig.group_size=1",
                "--gin.OnlineConfig.prompts_per_rollout=16"],
        # 40 of the 264 ids stop a completion, so that rows stop at scattered steps (a compacting sampler
        # then regroups them, each row's repetition-penalty context with it).
        "online_dpo": ["--gin.OnlineConfig.num_rollouts=2", "--gin.OnlineConfig.prompts_per_rollout=8",
                       f"--gin.RolloutConfig.stop_token_ids={list(range(100, 140))}",
                       "--gin.RolloutConfig.repetition_penalty=1.3"],
    }
    name = name or (method if mesh is None else f"{method}_{mesh}")
    files = [f"--gin_file={EXPERIMENT}"] + ([f"--gin_file=configs/mesh/{mesh}.gin"] if mesh else [])
    return {"name": name, "args": [
        *files, f"--gin.run.task=@{method}", f"--gin.{method}.model=@ModelConfig()",
        f"--gin.{method}.train_data='{task['prompts']}'", f"--gin.{method}.tokenizer='{task['tokenizer']}'",
        f"--gin.{method}.run_dir='{root / name}'", *extra[method], *(["--gin.Sampler.compact=True"] * compact)]}


def _jobs(task: dict, root: Path, rm_dir: Path, grpo_rollouts: int, compact: bool = False) -> list[dict]:
    """Every method on the experiment's FSDP mesh, then PPO (2 rollouts) on the TP mesh.

    One worker runs them one after another, so process start-up and the distributed set-up are paid once.
    ``compact``: online DPO's sampler compacts (the 2-process run's does; the 1-process run's does not, so
    their equality covers compaction across processes too).
    """
    jobs = [_job(task, root, rm_dir, m, grpo_rollouts=grpo_rollouts, compact=compact and m == "online_dpo")
            for m in ("grpo", "ppo", "online_dpo")]
    return [*jobs, _job(task, root, rm_dir, "ppo", mesh=TP)]


def _wait_for(paths: list[Path], jobs: list[Job], deadline: float) -> None:
    """Waits until every path exists; raises with a job's log if it exits first, or at the deadline."""
    while not all(p.exists() for p in paths):
        ended = [job for job in jobs if job.proc.poll() is not None]
        if ended or time.monotonic() > deadline:
            _wait(ended, deadline)  # raises for a job that failed
            raise AssertionError(f"{[job.name for job in ended] or 'timed out'}: no {[str(p) for p in paths]}")
        time.sleep(0.2)


def _worker(name: str, root: Path, jobs: list[dict], processes: int) -> list[Job]:
    spec = json.dumps(jobs)
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
    # The 2-process GRPO run stops after rollout 2 with a checkpoint; the 1-process worker, once through its
    # own runs, takes a copy of it to rollout 3 while the 2-process worker goes on with its TP run.
    ready = one / "grpo_resumed.ready"
    resume = {**_job(task, one, rm_dir, "grpo", "grpo_resumed", grpo_rollouts=3), "wait_for": str(ready)}
    jobs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        jobs += _worker("two", two, _jobs(task, two, rm_dir, 2, compact=True), 2)
        jobs += _worker("one", one, _jobs(task, one, rm_dir, 3) + [resume], 1)
        _wait_for([two / "grpo_0.json", two / "grpo_1.json"], jobs, deadline)  # written after the run's end
        shutil.copytree(two / "grpo", one / "grpo_resumed")
        ready.touch()
        _wait(jobs, deadline)
    finally:
        for job in jobs:
            job.kill()
    return {"two": two, "one": one}


def _rollout_records(run_dir: Path) -> list[dict]:
    """The run's records of its rollouts (held-out evaluations are records of their own)."""
    return [r for r in _records(run_dir) if "rollout" in r]


def _tokens(run_root: Path, name: str, process: int) -> list[np.ndarray]:
    with np.load(run_root / f"{name}_{process}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.parametrize("method,mesh", [("grpo", None), ("ppo", None), ("online_dpo", None), ("ppo", TP)],
                         ids=lambda v: v or "fsdp")
def test_two_processes_sample_and_train_like_one(runs, method, mesh):
    two, one = runs["two"], runs["one"]
    name = method if mesh is None else f"{method}_{mesh}"
    t0, t1, ref = _tokens(two, name, 0), _tokens(two, name, 1), _tokens(one, name, 0)
    assert len(t0) == 2 and len(ref) >= 2
    for a, b, c in zip(t0, t1, ref):
        np.testing.assert_array_equal(a, b)  # every process holds the whole rollout
        np.testing.assert_array_equal(a, c)  # and it is the 1-process rollout
    a, b = _rollout_records(two / name), _rollout_records(one / name)
    assert [r["rollout"] for r in a] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ("objective/scores", "objective/kl", "rollout/completion_length", "loss", "grad_norm",
                    "loss/policy", "loss/value", "objective/kl_coef", "pairs/valid_fraction", "policy_loss",
                    "policy/entropy", "policy/off_policy_masked_fraction"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=2e-5, abs=1e-6), (name, ra["step"], key)
        terms = sorted(k for k in rb if k.startswith("rewards/"))  # each reward source, over the global batch
        assert terms and terms == sorted(k for k in ra if k.startswith("rewards/"))
        for key in terms:
            assert ra[key] == pytest.approx(rb[key], rel=2e-5, abs=1e-6), (name, ra["step"], key)
    if name == "grpo":  # held-out evaluations (greedy completions, both reward sources) agree too
        evals = [[r for r in _records(d / name) if "eval/score" in r] for d in (two, one)]
        assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]][:2] and len(evals[0]) == 2
        for ra, rb in zip(*evals):
            assert set(ra) == set(rb) >= {"eval/score", "eval/rewards/reward_model/mean", "eval/completion_length"}
            for key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=2e-5, abs=1e-6), (name, ra["step"], key)
        # The best evaluated state: both processes chose and saved it together, the step of the first best score.
        scores = {r["step"]: r["eval/score"] for r in evals[0]}
        summary = json.loads((two / f"{name}_0.json").read_text())["summary"]
        assert summary["best/step"] == max(scores, key=lambda k: (scores[k], -k))
        assert Checkpointer(two / name / "checkpoints_best").all_steps() == [summary["best/step"]]
    # The samples log (rollout 1; written by process 0 alone): the same completions and scores.
    logs = [[json.loads(line) for line in (d / name / "samples" / "rollout_000001.jsonl").read_text().splitlines()]
            for d in (two, one)]
    assert len(logs[0]) == len(ref[0]) and [(x["prompt"], x["completion"]) for x in logs[0]] == [
        (x["prompt"], x["completion"]) for x in logs[1]]
    for x, y in zip(*logs):
        assert x["score"] == pytest.approx(y["score"], rel=2e-5, abs=1e-6)
        assert x["rewards"] == pytest.approx(y["rewards"], rel=2e-5, abs=1e-6)
        if name == "grpo":  # GDPO's, from each term's gathered values
            assert x["advantage"] == pytest.approx(y["advantage"], rel=2e-5, abs=1e-5)
    if name == "online_dpo":  # the 2-process run's sampler compacted: some decode phase ran on fewer rows
        for i in range(2):
            phases = json.loads((two / f"{name}_{i}.json").read_text())["sampler_phases"]
            assert any(b < p[0][0] for p in phases for b, _ in p), phases
    if name != "grpo":  # the 1-process FSDP GRPO run goes on to rollout 3 (see the resume test)
        _assert_same_weights(two / name, one / name)
    info = [json.loads((two / f"{name}_{i}.json").read_text()) for i in range(2)]
    info.append(json.loads((one / f"{name}_0.json").read_text()))
    assert [(i["process_count"], i["device_count"]) for i in info] == [(2, 8), (2, 8), (1, 8)]
    # Every model the rollouts used lay on the preset's mesh, split as the preset says (PPO: all four).
    models = {"ppo": ["policy", "reference", "reward_model", "value"],
              "grpo": ["policy", "reference", "reward_model"]}.get(method, ["policy", "reference"])
    for i in info:
        assert sorted(i["layouts"]) == models
        assert all(layout == LAYOUTS[mesh] for layout in i["layouts"].values()), i["layouts"]


def test_checkpoint_of_two_processes_resumes_in_one_process_identically(runs):
    one = runs["one"]
    resumed, straight = _rollout_records(one / "grpo_resumed"), _rollout_records(one / "grpo")
    assert [r["rollout"] for r in resumed] == [1, 2, 3]  # rollouts 1-2 written by the 2-process run
    assert _tokens(one, "grpo_resumed", 0)[0].tolist() == _tokens(one, "grpo", 0)[2].tolist()
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=2e-5, abs=1e-6)
    # The best state the 2-process run kept (its checkpoints_best) carried on: the same best as straight through.
    best = [json.loads((one / f"{n}_0.json").read_text())["summary"] for n in ("grpo_resumed", "grpo")]
    assert best[0]["best/step"] == best[1]["best/step"]
    assert best[0]["best/value"] == pytest.approx(best[1]["best/value"], rel=2e-5, abs=1e-6)
    _assert_same_weights(one / "grpo_resumed", one / "grpo")
