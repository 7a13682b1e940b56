"""A run whose run directory is a gs:// bucket, against a real GCS server on 127.0.0.1.

Every file of the run is read from or goes to the bucket (data, tokenizer,
config, lock, metrics, TensorBoard, checkpoints, export, summary); a run
killed mid-way resumes from its checkpoint in the bucket, and the metrics
never repeat a step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_env import subprocess_env
from gcs_emulator import gcs_emulator
from xla_test_flags import TEST_XLA_FLAGS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _write_inputs(cwd: Path) -> None:
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data
    write_task_data(str(cwd / "runs/demo/data"), n_sft=120, n_pref=8, n_prompts=8, n_eval=8)
    build_tokenizer(None, vocab_size=261).save_pretrained(str(cwd / "runs/demo/tokenizer"))


def test_run_dir_on_gcs_survives_a_kill(tmp_path, monkeypatch):
    _write_inputs(tmp_path)
    with gcs_emulator("jaxpost-test") as gcs_env:
        env = subprocess_env(**gcs_env, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS)
        cmd = [sys.executable, "-m", "jaxpost", "train", "--gin_file=configs/experiments/demo/sft.gin",
               "--gin.sft.run_dir=gs://jaxpost-test/runs/sft", "--gin.sft.train_data=gs://jaxpost-test/data/sft.jsonl",
               "--gin.sft.tokenizer=gs://jaxpost-test/tokenizer", "--gin.LoopConfig.num_steps=16",
               "--gin.LoopConfig.save_every=2", "--gin.LoopConfig.log_every=2", "--gin.LoopConfig.progress=False"]
        for k, v in gcs_env.items():  # the test's own epath/gcsfs reads go to the same server
            monkeypatch.setenv(k, v)
        import fsspec
        fs = fsspec.filesystem("gs")
        run = "gs://jaxpost-test/runs/sft"
        # Inputs in the bucket too, and not in the working directory: the run must read them from there.
        fs.put(str(tmp_path / "runs/demo/data/sft.jsonl"), "jaxpost-test/data/sft.jsonl")
        fs.put(str(tmp_path / "runs/demo/tokenizer"), "jaxpost-test/tokenizer", recursive=True)
        import shutil
        shutil.rmtree(tmp_path / "runs")

        def names(path):
            fs.invalidate_cache()  # another process writes the bucket: no cached listings
            return {p.rsplit("/", 1)[-1] for p in fs.ls(path)} if fs.exists(path) else set()

        def text(path):
            fs.invalidate_cache()
            return fs.cat(path).decode()

        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if any(n.isdigit() and int(n) >= 4 for n in names(f"{run}/checkpoints")):
                break
            time.sleep(0.5)
        assert first.poll() is None, first.stdout.read()
        os.killpg(first.pid, signal.SIGKILL)  # no clean-up of any kind: the lock and a partial save stay
        first.wait()
        lock = json.loads(text(f"{run}/jaxpost.lock"))
        assert lock["pid"] == first.pid  # the dead run's lock is still in the bucket

        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        resumed = int(second.stdout.split("[jaxpost] resuming from step ")[1].split()[0])
        assert 2 <= resumed < 16  # the newest step whose save had completed (commit_success.txt) when killed
        assert "Taking over the lock" in second.stderr

        files = names(run)
        assert {"config.gin", "operative_config.gin", "metrics.jsonl", "summary.json", "final", "tb",
                "checkpoints"} <= files
        assert "jaxpost.lock" not in files  # released at the end
        steps = [json.loads(line)["step"] for line in text(f"{run}/metrics.jsonl").splitlines()
                 if "loss" in json.loads(line)]
        assert steps == list(range(2, 17, 2))  # each step once, in order, across the kill
        assert json.loads(text(f"{run}/summary.json"))["step"] == 16
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= names(f"{run}/final")
        assert names(f"{run}/tb")
        assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))  # nothing mangled into the cwd

        # An online run's samples log goes to the bucket the same way (one object per rollout, written whole).
        from jaxpost import paths
        from jaxpost.train.online import SampleLog
        log = SampleLog(paths.resolve("gs://jaxpost-test/runs/grpo"), 2)
        for i in (1, 2, 3):
            log.write(i, [{"completion": f"c{i}", "score": 1.0}])
        assert names("gs://jaxpost-test/runs/grpo/samples") == {"rollout_000001.jsonl", "rollout_000003.jsonl"}
        assert json.loads(text("gs://jaxpost-test/runs/grpo/samples/rollout_000003.jsonl")) == {
            "rollout": 3, "completion": "c3", "score": 1.0}
