"""A run directory belongs to one run: the lock, the config check on resume, restart keeping the old run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import gin
import pytest

from jaxpost import config as jconfig
from jaxpost.errors import UserError
from jaxpost.train import run_dir as rd


@pytest.fixture(autouse=True)
def _release():
    yield
    rd.release_run_dirs()
    gin.clear_config()


def _open(path, *bindings, **resume):
    jconfig.parse([], ["run.task = @sft", "sft.train_data = 'a.jsonl'", *bindings])
    return rd.open_run_dir(path, rd.ResumeConfig(**resume))


def _fake_checkpoint(path, step=4):
    (path / "checkpoints" / str(step)).mkdir(parents=True)


def _foreign_lock(path, pid, host=None, heartbeat=None):
    import time
    path.mkdir(parents=True, exist_ok=True)
    (path / rd.LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                                 "since": "earlier", "heartbeat": heartbeat or time.time()}))


def test_relative_run_dir_is_resolved_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _open("runs/x")
    assert os.fspath(path) == str(tmp_path / "runs" / "x")
    assert "sft.train_data = 'a.jsonl'" in (tmp_path / "runs/x/config.gin").read_text()
    assert json.loads((tmp_path / "runs/x" / rd.LOCK_NAME).read_text())["pid"] == os.getpid()
    rd.release_run_dirs()
    assert not (tmp_path / "runs/x" / rd.LOCK_NAME).exists()


def test_a_live_run_holds_the_directory(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _foreign_lock(tmp_path, other.pid)
        with pytest.raises(UserError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                            rf"process {other.pid}, since earlier\)"):
            _open(tmp_path)
    finally:
        other.kill()
        other.wait()
    _open(tmp_path)  # the holder is gone now: its lock is stale and taken over
    assert json.loads((tmp_path / rd.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    _foreign_lock(tmp_path, 1, host="worker-7")
    with pytest.raises(UserError, match="host worker-7, process 1"):
        _open(tmp_path)
    _foreign_lock(tmp_path, 1, host="worker-7", heartbeat=1.0)  # last beat long ago
    _open(tmp_path)


def test_resume_with_a_changed_config_is_refused_naming_each_key(tmp_path):
    _open(tmp_path, "make_optimizer.learning_rate = 0.001", "LoopConfig.num_steps = 10")
    _fake_checkpoint(tmp_path)
    rd.release_run_dirs()
    with pytest.raises(UserError) as err:
        _open(tmp_path, "make_optimizer.learning_rate = 0.01", "LoopConfig.num_steps = 20",
              "sft.train_data = 'b.jsonl'")
    msg = str(err.value)
    assert "make_optimizer.learning_rate: 0.001 -> 0.01" in msg and "sft.train_data: 'a.jsonl' -> 'b.jsonl'" in msg
    assert "num_steps" not in msg  # training longer is a resume, not another run
    assert "--on_config_change=allow" in msg and "--on_config_change=restart" in msg
    assert not (tmp_path / rd.LOCK_NAME).exists()  # a refused run leaves no lock behind
    # Only the step count changed: resumes without a word.
    _open(tmp_path, "make_optimizer.learning_rate = 0.001", "LoopConfig.num_steps = 30")


def test_an_online_run_resumes_with_new_cadences_and_stopping_settings(tmp_path):
    """As LoopConfig's: how often an online run logs, evaluates, saves and writes samples, and when it stops early,
    may change on resume; what it samples and trains on may not."""
    _open(tmp_path, "OnlineConfig.num_rollouts = 4", "OnlineConfig.prompts_per_rollout = 8")
    _fake_checkpoint(tmp_path)
    rd.release_run_dirs()
    _open(tmp_path, "OnlineConfig.num_rollouts = 8", "OnlineConfig.prompts_per_rollout = 8",
          "OnlineConfig.log_every = 2", "OnlineConfig.eval_every = 2", "OnlineConfig.save_every = 2",
          "OnlineConfig.samples_every = 0", "OnlineConfig.progress = False", "OnlineConfig.patience = 3",
          "OnlineConfig.min_delta = 0.01")
    rd.release_run_dirs()
    with pytest.raises(UserError, match=r"OnlineConfig\.prompts_per_rollout: 8 -> 16"):
        _open(tmp_path, "OnlineConfig.prompts_per_rollout = 16")


def test_allow_continues_and_restart_moves_the_old_run_aside(tmp_path, capsys):
    run = tmp_path / "run"
    _open(run, "make_optimizer.learning_rate = 0.001")
    _fake_checkpoint(run)
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    rd.release_run_dirs()

    _open(run, "make_optimizer.learning_rate = 0.002", on_config_change="allow")
    assert "resuming" in capsys.readouterr().out
    assert "0.001" in (run / "config.previous.gin").read_text() and "0.002" in (run / "config.gin").read_text()
    rd.release_run_dirs()

    _open(run, "make_optimizer.learning_rate = 0.003", on_config_change="restart")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1
    assert (aside[0] / "checkpoints" / "4").exists() and (aside[0] / "metrics.jsonl").exists()  # kept, not deleted
    assert sorted(p.name for p in run.iterdir()) == ["config.gin", rd.LOCK_NAME]


def test_config_bindings_parse_multiline_values():
    text = "# comment\nA.x = 1\nB.y = [1,\n    2]\nscope/C.z = 'q'\n"
    assert rd.config_bindings(text) == {"A.x": "1", "B.y": "[1, 2]", "scope/C.z": "'q'"}
    assert rd.config_changes("A.x = 1\nsft.run_dir = 'a'\n", "A.x = 2\nsft.run_dir = 'b'\n") == [("A.x", "1", "2")]


def test_operative_config_is_written_when_training_starts_with_the_model_as_used(tmp_path, monkeypatch):
    """The operative config exists as soon as training starts, and shows the model as init_from set it."""
    from jaxpost import models
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.hf import save_hf
    import jaxpost.train.fit as common  # the module whose `train` the test replaces

    ckpt = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1)
    save_hf(tmp_path / "hf", ckpt, models.create(ckpt, seed=0)[1])
    build_tokenizer(None, vocab_size=261).save_pretrained(tmp_path / "hf")
    data = write_task_data(tmp_path / "data", n_sft=16, n_pref=2, n_prompts=2, n_eval=2)

    class Stop(Exception):
        pass

    seen = {}

    def stop_in_the_loop(**kw):
        seen["text"] = (tmp_path / "run" / "operative_config.gin").read_text()
        raise Stop

    monkeypatch.setattr(common, "train", stop_in_the_loop)
    jconfig.parse(["configs/runs/sft.gin"], [f"sft.run_dir = '{tmp_path / 'run'}'", f"sft.train_data = '{data['sft']}'",
                                            f"sft.init_from = '{tmp_path / 'hf'}'", "sft.seq_len = 128",
                                            "ModelConfig.hidden_size = 64", "ModelConfig.remat = 'full'"])
    with pytest.warns(UserWarning, match="hidden_size"), pytest.raises(Stop):
        from jaxpost.recipes import run
        run()
    text = seen["text"]
    assert "ModelConfig.hidden_size = 32" in text and "ModelConfig.hidden_size = 64" not in text
    assert "ModelConfig.remat = 'full'" in text  # numerics come from the run
    assert "make_optimizer.learning_rate = 2e-05" in text  # read by the step, before the first batch trains
