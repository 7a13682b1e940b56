"""Feedback logs and continual rounds: validation naming file and line, the held-out gate (a regressing round is
rejected), snapshots recording their feedback, and kill -9 / restart training every file exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxpost import cli
from jaxpost.data import feedback
from jaxpost.errors import UserError
from cli_env import subprocess_env
from pipeline_utils import tiny_model_dir
from xla_test_flags import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]


def feedback_records(n: int, seed: int, kinds=("binary",)) -> list[dict]:
    """Users like replies drawn from 'abcd' and dislike replies from 'efgh'."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(4))
        reply = lambda good: "".join(rng.choice("abcd" if good else "efgh") for _ in range(rng.randint(2, 4)))
        kind, good = kinds[i % len(kinds)], rng.random() < 0.5
        rec = {"prompt": f"say: {word} ", "model_version": "v0"}
        if kind == "binary":
            rec.update(completion=reply(good), label=good)
        elif kind == "rating":
            rec.update(completion=reply(good), rating=5 if good else 1)
        else:
            rec.update(chosen=reply(True), rejected=reply(False))
        out.append(rec)
    return out


def write_log(path: Path, records: list[dict]) -> Path:
    tmp = path.with_name("." + path.name + ".tmp")  # appear whole, as docs/feedback.md asks of writers
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)
    return path


# --- the format -------------------------------------------------------------------------------------------------

def test_feedback_records_and_their_training_rows(tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "label": False, "model_version": "v2", "user": "u1"}
    recs = feedback.read_feedback(write_log(tmp_path / "a.jsonl", feedback_records(3, 0, ("binary", "rating", "choice"))
                                            + [conv]))
    assert [r["kind"] for r in recs] == ["binary", "rating", "choice", "binary"]
    unpaired, pairs = feedback.training_rows(recs, rating_threshold=4)
    assert len(unpaired) == 3 and len(pairs) == 1 and unpaired[1]["label"] is True  # rating 5 >= 4
    assert unpaired[2] == {"prompt": [{"role": "user", "content": "hi"}],
                           "completion": [{"role": "assistant", "content": "yo"}], "label": False}
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "completion": "c", "label": true}', "'model_version' must be a non-empty string"),
    ('{"prompt": "p", "completion": "c", "label": "up", "model_version": "v"}', "'label' must be true"),
    ('{"prompt": "p", "completion": "c", "label": true, "rating": 3, "model_version": "v"}', "exactly one of"),
    ('{"prompt": "p", "label": true, "model_version": "v"}', "'completion' is missing"),
    ('{"prompt": "p", "chosen": "a", "model_version": "v"}', "'rejected' is missing"),
    ('{"prompt": "p", "completion": "c", "rating": "5", "model_version": "v"}', "'rating' must be a number"),
    ('{"messages": [{"role": "user", "content": "q"}], "label": true, "model_version": "v"}', "ending with the assistant"),
    ('{"prompt": "p", "completion": [{"role": "assistant", "content": "c"}], "label": true, "model_version": "v"}',
     "both be strings or both conversations"),
    ('{"prompt": "p", "completion": "c", "label": true, "model_version": "v"', "not valid JSON"),
])
def test_a_bad_record_is_one_error_naming_file_and_line(tmp_path, bad, message):
    good = json.dumps(feedback_records(1, 0)[0])
    path = tmp_path / "log.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad}\n")
    with pytest.raises(UserError, match=message) as e:
        feedback.read_feedback(path)
    assert f"{path} line 4:" in str(e.value)


# --- rounds -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    model = tiny_model_dir(root / "offline")
    held = write_log(root / "heldout.jsonl", feedback_records(16, 99, ("binary", "binary", "choice")))
    return root, model, held


def _args(run_dir, inbox, model, held, *extra):
    return ["train", f"--gin_file={REPO}/configs/runs/continual.gin", f"--gin.continual.run_dir={run_dir}",
            f"--gin.continual.feedback_dir={inbox}", f"--gin.continual.init_from={model}",
            f"--gin.continual.eval_data={held}", "--gin.continual.min_records=16", "--gin.continual.wait=False",
            "--gin.continual.seq_len=32", "--gin.continual.batch_size=8", "--gin.LoopConfig.progress=False",
            "--gin.make_kto_loss.beta=0.5", *extra]


@pytest.mark.parametrize("wrong,expected", [
    ("init_from", "continual.init_from='missing' not found: no local directory {cwd}/missing"),
    ("feedback_dir", "continual.feedback_dir='missing' does not exist (looked in {cwd}/missing); create it"),
    ("eval_data", "continual.eval_data='missing' does not exist (looked in {cwd}/missing); give a feedback log"),
])
def test_a_missing_input_is_named_by_its_key_before_the_run_directory_is_made(setup, tmp_path, monkeypatch, capsys,
                                                                               wrong, expected):
    root, model, held = setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Path("inbox").mkdir()
    given = {"init_from": model, "feedback_dir": "inbox", "eval_data": held, wrong: "missing"}
    assert cli.main(_args("live", given["feedback_dir"], given["init_from"], given["eval_data"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpost: error: " + expected.format(cwd=tmp_path)) and err.count("\n") == 1, err
    assert not Path("live").exists()


def test_rounds_accept_improvements_reject_a_regression_and_record_their_files(setup, tmp_path):
    root, model, held = setup
    inbox, run = tmp_path / "inbox", tmp_path / "live"
    inbox.mkdir()
    write_log(inbox / "001.jsonl", feedback_records(24, 1))
    write_log(inbox / "002.jsonl", feedback_records(8, 2, ("choice",)))  # mixed round: KTO then DPO
    (inbox / ".003.jsonl.tmp").write_text("half a li")                     # still being written: not read
    good = _args(run, inbox, model, held, "--gin.make_optimizer.learning_rate=3e-3")
    assert cli.main(good) == 0
    state = json.loads((run / "state.json").read_text())
    (r1,) = state["rounds"]
    assert r1["accepted"] and r1["methods"] == ["kto", "dpo"], r1
    assert r1["score"] < r1["previous_score"]
    snap = json.loads((run / "snapshots/0001/feedback.json").read_text())
    assert snap["trained_on"] == ["001.jsonl", "002.jsonl"] and snap["model_version"] == "round-0001"
    assert state["current"]["model"] == str(run / "snapshots/0001")
    with open(inbox / "001.jsonl", "a") as f:  # a consumed log changed afterwards: reported, never trained again
        f.write(json.dumps(feedback_records(1, 3)[0]) + "\n")
    assert cli.main(good) == 0 and len(json.loads((run / "state.json").read_text())["rounds"]) == 1  # nothing new

    # Too little new feedback waits; a malformed file is skipped, named, and never trained.
    write_log(inbox / "004.jsonl", feedback_records(8, 4))
    bad = feedback_records(20, 5)
    bad[6]["label"] = "maybe"
    write_log(inbox / "005.jsonl", bad)
    assert cli.main(good) == 0
    state = json.loads((run / "state.json").read_text())
    assert len(state["rounds"]) == 1 and "005.jsonl line 7" in state["invalid"]["005.jsonl"]["error"]

    # A round that wrecks the model (a huge learning rate) is rejected: the previous snapshot stays current.
    write_log(inbox / "006.jsonl", feedback_records(16, 6))
    assert cli.main([*good, "--gin.make_optimizer.learning_rate=0.5", "--on_config_change=allow"]) == 0
    state = json.loads((run / "state.json").read_text())
    r2 = state["rounds"][1]
    assert not r2["accepted"] and "regressed" in r2["reason"], r2
    assert [f["name"] for f in r2["files"]] == ["004.jsonl", "006.jsonl"]
    assert state["current"]["model"] == str(run / "snapshots/0001") and not (run / "snapshots/0002").exists()


@pytest.mark.slow
def test_kill_9_at_every_stage_of_a_round_and_restart_trains_each_file_exactly_once(setup, tmp_path):
    """The command in a subprocess, SIGKILLed in each stage of a round as files arrive, restarted each time."""
    root, model, held = setup
    inbox, run = tmp_path / "inbox", tmp_path / "live"
    inbox.mkdir()
    files = [f"{i:03d}.jsonl" for i in range(1, 5)]
    env = subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "jaxpost", *_args(run, inbox, model, held, "--gin.make_optimizer.learning_rate=1e-3",
                                                  "--gin.LoopConfig.num_epochs=2", "--gin.LoopConfig.save_every=2",
                                                  "--gin.continual.tolerance=100.0")]

    def pending_round() -> Path:
        n = len(json.loads((run / "state.json").read_text())["rounds"]) if (run / "state.json").exists() else 0
        return run / "rounds" / f"{n + 1:04d}"

    # Where a kill lands is read from the run's own progress, not from the clock, so that each stage is hit
    # whatever the machine's speed: the plan fixed; a run training (its metrics started, checkpoints on the way);
    # training done, the held-out gate evaluating.
    stages = {"planned": lambda d: (d / "plan.json").exists(),
              "training": lambda d: any(p.stat().st_size for p in d.glob("*/metrics.jsonl")),
              "trained": lambda d: (d / "kto" / "summary.json").exists()}
    rng = random.Random(0)
    kills = mid_round = 0
    for i, (name, stage) in enumerate(zip(files, ("planned", "training", "trained", "training"))):
        write_log(inbox / name, feedback_records(16, 10 + i, ("binary", "choice") if i % 2 else ("binary",)))
        log = tmp_path / f"killed-{i}.log"
        with open(log, "w") as err:
            rdir = pending_round()  # this file's round
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
            end = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < end and not stages[stage](rdir):
                time.sleep(0.01)
            assert proc.poll() is None, f"the run ended before its round was {stage}: {log.read_text()[-3000:]}"
            time.sleep(rng.uniform(0.0, 0.3) if stage != "trained" else 0.0)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        kills += 1
        mid_round += pending_round() == rdir  # killed while its round was planned but not recorded
        restart = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert restart.returncode == 0, restart.stderr[-3000:]  # finishes the pending round (and any new file)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # nothing new: a rerun changes nothing
    assert kills == 4 and mid_round == 4, (kills, mid_round)  # every kill left its round pending

    state = json.loads((run / "state.json").read_text())
    trained = [f["name"] for r in state["rounds"] for f in r["files"]]
    assert sorted(trained) == files, state["rounds"]  # each file in exactly one recorded round
    assert not (run / "rounds" / f"{len(state['rounds']) + 1:04d}").exists()  # nothing left pending
    for r in state["rounds"]:
        rdir = run / "rounds" / f"{r['round']:04d}"
        records = [rec for f in r["files"] for rec in feedback.read_feedback(inbox / f["name"])]
        unpaired, pairs = feedback.training_rows(records, 4.0)
        for method, rows in (("kto", unpaired), ("dpo", pairs)):
            assert (method in r["methods"]) == bool(rows)
            if rows:  # the round's run trained on exactly its files' rows, each step once
                assert [json.loads(x) for x in (rdir / f"{method}.jsonl").read_text().splitlines()] == \
                    json.loads(json.dumps(rows))
                steps = [m["step"] for m in map(json.loads, (rdir / method / "metrics.jsonl").read_text().splitlines())
                         if "loss" in m]
                assert steps == sorted(set(steps)) and steps[-1] == json.loads(
                    (rdir / method / "summary.json").read_text())["num_steps"]
        assert r["accepted"]  # tolerance 100: every round is published
        snap = json.loads((run / "snapshots" / f"{r['round']:04d}" / "feedback.json").read_text())
        assert snap["files"] == r["files"]
    last = json.loads((run / "snapshots" / f"{len(state['rounds']):04d}" / "feedback.json").read_text())
    assert last["trained_on"] == files and state["current"]["model"].endswith(f"{len(state['rounds']):04d}")


def test_a_record_holding_unicode_line_separators_is_one_record(tmp_path):
    # A reply may hold U+2028 or U+0085 (raw in JSON written with ensure_ascii=False); str.splitlines would
    # cut such a line in two and report it malformed.
    recs = feedback_records(2, 0)
    recs[0]["completion"] = "ab\u2028cd\x85"
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    got = feedback.read_feedback(path)
    assert len(got) == 2 and got[0]["completion"] == "ab\u2028cd\x85"
