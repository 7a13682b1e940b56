"""The user's path: Ctrl-C a running ``jaxpost train``, read what it says, run the same command again.

The loop-level contract (the step a signal lands in, a second Ctrl-C, online
rollouts, the rerun equal to an unbroken run) is in ``test_interrupt.py``;
two processes stopping at one step, in ``test_multihost.py``.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jaxpost.train import Checkpointer
from cli_env import subprocess_env
from xla_test_flags import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["jaxpost", "train", "--gin_file=configs/experiments/demo/sft.gin", "--gin.LoopConfig.num_steps=80",
           "--gin.sft.run_dir=runs/stopped", "--gin.LoopConfig.progress=False"]

pytestmark = pytest.mark.slow


def test_ctrl_c_saves_says_so_and_the_same_command_resumes(tmp_path):
    sig = signal.SIGINT  # SIGTERM takes the same path (test_interrupt.py; two processes in test_multihost.py)
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data

    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_task_data(tmp_path / "runs/demo/data", n_sft=64, n_pref=8, n_prompts=8, n_eval=8)
    build_tokenizer(None, vocab_size=261).save_pretrained(tmp_path / "runs/demo/tokenizer")
    env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith("JAXPOST_")}, JAX_PLATFORMS="cpu",
                         XLA_FLAGS=TEST_XLA_FLAGS)
    metrics = tmp_path / "runs/stopped/metrics.jsonl"

    proc = subprocess.Popen(COMMAND, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first logged step (25): the loop is running
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (proc.returncode, out[-2000:], err[-3000:])
    found = re.search(rf"^jaxpost: stopped by {signal.Signals(sig).name} at step (\d+) of 80: a checkpoint of "
                      rf"step \1 is saved in (\S+); run the same command again to resume from it$", err, re.M)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 25 <= step < 80 and "Traceback" not in err
    assert Path(found.group(2)) == tmp_path / "runs/stopped/checkpoints"
    assert step in Checkpointer(tmp_path / "runs/stopped/checkpoints").all_steps()

    again = subprocess.run(COMMAND, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {step} " in again.stdout
    # The last line is the run's summary in JSON, as summary.json holds it.
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "runs/stopped/summary.json").read_text())
    assert summary["step"] == 80
    assert (tmp_path / "runs/stopped/final/model.safetensors").is_file()
