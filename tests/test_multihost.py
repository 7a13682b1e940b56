"""Real multi-process runs on one machine: 2 processes x 4 CPU devices, gloo collectives.

How the runs are compared. Every host reads all rows and builds the same
global batch (shuffle, packing and batching depend on the seed alone, not on
the number of hosts); each host puts on its devices only the rows they hold
(``jaxpost.train.batches.on_mesh``). The reference is a plain single process
with 8 devices running the same command; SFT and DPO run with shuffle and
packing on. Same global batches, same 8-device mesh, so losses, gradient
norms and the exported weights must agree to float32 round-off (only the
order of the cross-process sums differs), and a checkpoint of the
2-process run resumes exactly in one process. The 2-process DPO run has its
layers scanned (``ModelConfig.scan_layers``) and its reference unrolled:
layouts and process counts give the same run.

All runs start together in one module fixture (they are mostly start-up and
compilation), each bounded by a timeout and killed on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest
from safetensors.numpy import load_file

from jaxpost.train import Checkpointer
from cli_env import subprocess_env
from pipeline_utils import make_task
from xla_test_flags import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "multihost_worker.py")
EXPERIMENT = "configs/experiments/local_multihost_sft.gin"
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXPOST_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return subprocess_env(env)


class Job:
    """A subprocess in its own process group with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, deadline: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            return None
        finally:
            self._out.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this job started: launcher and its children
            self.proc.wait()
        self._out.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _wait(jobs: list[Job], deadline: float, expect: int = 0) -> None:
    for job in jobs:
        rc = job.wait(deadline)
        if rc != expect:
            raise AssertionError(f"{job.name} {'timed out' if rc is None else f'exited with {rc}'}:\n{job.tail()}")


def _two_processes(name: str, args: list[str], root: Path, extra_env: dict | None = None) -> list[Job]:
    """The two processes of a run; ``extra_env`` maps a process index to more variables for it."""
    port = portpicker.pick_unused_port()
    return [Job(f"{name}[process {i}]", [sys.executable, WORKER, str(root / f"{name}_{{process}}.json"), *args],
                _env(4, JAXPOST_COORDINATOR=f"127.0.0.1:{port}", JAXPOST_NUM_PROCESSES="2",
                     JAXPOST_PROCESS_ID=str(i), **(extra_env or {}).get(i, {})), root / f"{name}_{i}.log")
            for i in range(2)]


def _one_process(name: str, args: list[str], root: Path) -> Job:
    return Job(name, [sys.executable, WORKER, str(root / f"{name}_{{process}}.json"), *args], _env(8),
               root / f"{name}.log")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    task = make_task(root, n_sft=200, n_pref=96, n_prompts=8, n_eval=8)

    def sft_args(run_dir: Path, steps: int) -> list[str]:
        return [f"--gin_file={EXPERIMENT}", f"--gin.sft.train_data={task['sft']}",
                f"--gin.sft.tokenizer={task['tokenizer']}", f"--gin.sft.run_dir={run_dir}",
                f"--gin.LoopConfig.num_steps={steps}"]

    def dpo_args(run_dir: Path) -> list[str]:
        return [f"--gin_file={EXPERIMENT}", "--gin.run.task=@dpo", "--gin.dpo.model=@ModelConfig()",
                "--gin.dpo.loop=@LoopConfig()", f"--gin.dpo.train_data={task['preference']}",
                f"--gin.dpo.tokenizer={task['tokenizer']}", f"--gin.dpo.run_dir={run_dir}",
                "--gin.dpo.seq_len=64", "--gin.dpo.batch_size=8", "--gin.dpo.eval_fraction=0.1",
                "--gin.dpo.packing=True",  # packing bins over the global batch (shuffle is on by default)
                "--gin.LoopConfig.num_steps=2", "--gin.LoopConfig.eval_every=2", "--gin.LoopConfig.eval_batches=2"]

    dirs = {k: root / k for k in ("sft_launcher", "sft_reference", "dpo_2proc", "dpo_reference", "sft_resumed",
                                  "sft_preempted")}
    launcher = Job("launch/local.sh", ["bash", "launch/local.sh", "2", "jaxpost", "train",
                                       *sft_args(dirs["sft_launcher"], 3)],
                   _env(4, PORT=str(portpicker.pick_unused_port()), DEVICES_PER_PROCESS="4",
                        LOG_DIR=str(root / "launcher_logs")), root / "launcher.log")
    jobs = [launcher]
    deadline = time.monotonic() + TIMEOUT_S
    try:  # on any failure or timeout every job is killed and the failing one's log shown
        jobs += [*_two_processes("dpo_2proc", dpo_args(dirs["dpo_2proc"]) + ["--gin.ModelConfig.scan_layers=True"],
                                 root),
                 _one_process("sft_reference", sft_args(dirs["sft_reference"], 6), root),
                 _one_process("dpo_reference", dpo_args(dirs["dpo_reference"]), root)]
        # Process 1 alone gets SIGTERM (a preempted VM) after step 2: both must stop at one saved step.
        preempted = _two_processes("sft_preempted", sft_args(dirs["sft_preempted"], 6), root,
                                   {1: {"JAXPOST_TEST_SIGTERM_AT_STEP": "2"}})
        jobs += preempted
        _wait([launcher], deadline)
        # The 2-process run stopped after step 3 with a checkpoint; one process (8 devices) takes it to step 6.
        shutil.copytree(dirs["sft_launcher"], dirs["sft_resumed"])
        jobs.append(_one_process("sft_resumed", sft_args(dirs["sft_resumed"], 6), root))
        _wait([j for j in jobs[1:] if j not in preempted], deadline)
        _wait(preempted, deadline, expect=143)  # 128 + SIGTERM, as the command line exits
    finally:
        for job in jobs:
            job.kill()
    return {"root": root, **dirs}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


def _data_states(run_dir: Path, step: int) -> list:
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        return ckpt.data_states(step)
    finally:
        ckpt.close()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    # AdamW divides by sqrt(v) + 1e-8: an element whose gradient sums to ~1e-8 out of cancelling terms turns
    # summation-order noise (8 shards vs 2 x 4) into update noise of up to the learning rate (3e-3). 1e-5 is
    # 0.3% of one step; a real sharding bug moves many weights by whole steps.
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=2e-5, atol=1e-5, err_msg=name)


def test_two_processes_sft_equals_one_process_with_eight_devices(runs):
    two, one = runs["sft_launcher"], runs["sft_reference"]
    for key in ("loss", "grad_norm"):
        a, b = _by_step(two, key), _by_step(one, key)
        assert sorted(a) == [1, 2, 3]
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=2e-6), (key, step, a[step], b[step])
    losses = _by_step(one, "loss")
    assert losses[3] < losses[1]  # it trains, so the comparison is of a moving run
    # Real tokens per step, counted on the devices over both processes' rows: the same global batches.
    per_step = [{r["step"]: r["tokens_per_s"] / r["steps_per_s"] for r in _records(d) if "tokens_per_s" in r}
                for d in (two, one)]
    assert sorted(per_step[0]) == [1, 2, 3]
    assert per_step[0] == pytest.approx({s: per_step[1][s] for s in per_step[0]}, rel=1e-9)


def test_two_processes_dpo_equals_one_process_with_eight_devices(runs):
    two, one = runs["dpo_2proc"], runs["dpo_reference"]
    a, b = _records(two), _records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=2e-5, abs=1e-6), (ra["step"], key, ra[key], rb[key])
    assert any("eval/loss" in r for r in a)  # the held-out evaluation ran across both processes
    _assert_same_weights(two, one)
    for i in range(2):
        info = json.loads((runs["root"] / f"dpo_2proc_{i}.json").read_text())
        assert (info["process_index"], info["process_count"], info["device_count"],
                info["local_device_count"]) == (i, 2, 8, 4)


def test_checkpoint_of_two_processes_resumes_in_one_process_identically(runs):
    resumed, straight = runs["sft_resumed"], runs["sft_reference"]
    # One data position, the same on every host (they read the same global batches).
    states = _data_states(runs["sft_launcher"], 3)
    assert len(states) == 1 and set(states[0]) == {"grain", "stats"}
    a, b = _by_step(resumed, "loss"), _by_step(straight, "loss")
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert a[step] == pytest.approx(b[step], rel=2e-6), (step, a[step], b[step])
    _assert_same_weights(resumed, straight)
    # Neither repeats nor skips data: the final positions are the uninterrupted run's. (The example counts
    # of the stats include what grain's prefetch thread had read ahead when the state was taken, so they are not
    # compared.)
    assert [s["grain"] for s in _data_states(resumed, 6)] == [s["grain"] for s in _data_states(straight, 6)]
    log = (runs["root"] / "sft_resumed.log").read_text(errors="replace")
    assert "order differs" not in log and "written by" not in log, log  # no warning about another host count


def test_sigterm_to_one_process_stops_both_at_one_saved_step(runs):
    stops = [json.loads((runs["root"] / f"sft_preempted_{i}.json").read_text())["interrupted"] for i in range(2)]
    assert stops[0] == stops[1], stops  # the same step, signal and message on both processes
    step = stops[0]["step"]
    assert stops[0]["signal"] == "SIGTERM" and 2 < step < 6, stops
    ckpt = Checkpointer(runs["sft_preempted"] / "checkpoints")
    try:
        assert ckpt.all_steps() == [step]  # saved because of the signal: the run saves only at its end
    finally:
        ckpt.close()
    a, b = _by_step(runs["sft_preempted"], "loss"), _by_step(runs["sft_reference"], "loss")
    assert sorted(a) == list(range(1, step + 1))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=2e-6), (s, a[s], b[s])
    assert not (runs["sft_preempted"] / "final").exists()


def test_launcher_run_writes_run_files_once_from_process_zero(runs):
    run_dir, logs = runs["sft_launcher"], runs["root"] / "launcher_logs"
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == [1, 2, 3]  # one record per step: process 1 wrote nothing
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    for name in ("config.gin", "operative_config.gin", "summary.json", "final/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 3
    assert (logs / "process_0.log").is_file() and (logs / "process_1.log").is_file()
    assert "Traceback" not in (logs / "process_1.log").read_text()
