"""A multi-turn rollout over 2 processes x 4 CPU devices equals 1 process x 8 devices (gloo collectives).

Each process runs the environments (and their tools) of its own rows only;
observation tokens, rewards and flags are all-gathered, so every process holds
the same conversations, masks, scores and log-probs as the 1-process run.
"""

import json
import sys
import time

import numpy as np
import portpicker
import pytest
from test_multihost import REPO, Job, _env, _wait

WORKER = str(REPO / "tests" / "multiturn_worker.py")
pytestmark = pytest.mark.slow


def test_two_processes_hold_the_one_process_rollout(tmp_path):
    port = portpicker.pick_unused_port()
    jobs = [Job("one", [sys.executable, WORKER, str(tmp_path)], _env(8), tmp_path / "one.log")]
    _wait(jobs, time.monotonic() + 300)
    jobs = [Job(f"two[{i}]", [sys.executable, WORKER, str(tmp_path)],
                _env(4, JAXPOST_COORDINATOR=f"127.0.0.1:{port}", JAXPOST_NUM_PROCESSES="2",
                     JAXPOST_PROCESS_ID=str(i)), tmp_path / f"two_{i}.log") for i in range(2)]
    _wait(jobs, time.monotonic() + 300)
    one, *two = (json.loads((tmp_path / f"out_{n}_{p}.json").read_text()) for n, p in ((1, 0), (2, 0), (2, 1)))
    for got in two:
        for key in ("tokens", "mask", "scores"):
            np.testing.assert_array_equal(got[key], one[key])
        np.testing.assert_allclose(got["old"], one["old"], atol=1e-5)
        assert got["metrics"]["env/turns"] == one["metrics"]["env/turns"] > 1
    assert one["seen"] == 16 and [t["seen"] for t in two] == [8, 8]  # each process ran only its own episodes
    assert 0 < one["metrics"]["env/tool_errors"] < 1
