"""`jaxpost demo` at a reduced size: every stage improves on the stage before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxpost.demo import run_demo
from jaxpost.demo.run import STAGES
from cli_env import subprocess_env


@pytest.mark.slow
def test_demo_quick_every_stage_improves(tmp_path):
    """`jaxpost demo --quick` through the CLI, on one CPU device as a user runs it.

    A subprocess, because the suite's 8 fake devices (tests/conftest.py)
    would split the tiny demo batches 8 ways and make it much slower.
    """
    env = subprocess_env({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    proc = subprocess.run([sys.executable, "-m", "jaxpost", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "report:" in proc.stdout
    table = json.loads((tmp_path / "demo" / "results.json").read_text())
    stages = [row["stage"] for row in table]
    assert stages[:2] == ["init", "sft"] and "reward" in stages and "ppo" in stages
    assert stages[-1] == "distill"  # the smaller student, distilled from GRPO, must beat SFT
    for row in table[1:]:
        assert row["improved"], f"stage {row['stage']} did not beat {row['baseline']}: {row}"
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| ppo |" in report and "| grpo |" in report and "| distill |" in report
    assert [row["stage"] for row in table] == ["init"] + [s.name for s in STAGES]

    # The feedback stage on that demo: simulated users rate the SFT policy, one continual round per batch.
    proc = subprocess.run([sys.executable, "-m", "jaxpost", "demo", "--feedback", "--quick", "--out",
                           str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rounds = json.loads((tmp_path / "demo" / "feedback" / "results.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(0 <= r["reward"] <= 1 for r in rounds)
    state = json.loads((tmp_path / "demo" / "feedback" / "live" / "state.json").read_text())
    trained = [f["name"] for r in state["rounds"] for f in r["files"]]
    assert trained == ["batch-001.jsonl", "batch-002.jsonl"]  # each batch of feedback trained one round, once
    for r in state["rounds"]:
        snapshot = tmp_path / "demo" / "feedback" / "live" / "snapshots" / f"{r['round']:04d}"
        assert snapshot.exists() == r["accepted"]


def test_demo_refuses_an_out_dir_holding_an_earlier_run(tmp_path, capsys):
    from jaxpost.cli import main

    (tmp_path / "demo" / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "demo" / "grpo").mkdir()
    with pytest.raises(FileExistsError, match=r"already holds a demo run \(stages sft, grpo\).*--resume"):
        run_demo(tmp_path / "demo", quick=True, log=lambda s: None)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    assert "--out NEW_DIR" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["grpo", "sft"]  # nothing written or deleted
