"""Synthetic data: filters and selection by hand, outputs load into the SFT/reward/DPO pipelines, best-of-N helps."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from jaxpost.data import build_tokenizer, load_rows, make_lm_pipeline, make_preference_pipeline
from jaxpost.demo.task import reversal_reward
from jaxpost.generate import REWARDS, SamplingConfig, register_reward
from jaxpost.cli import synthesize_main
from jaxpost.generate.synthesis import SynthesisStats, filter_samples, normalise, write_prompt_samples
from jaxpost.recipes.synthetic import synthesize
from pipeline_utils import make_task, run_task


def test_normalise_and_filters_count_every_drop_in_order():
    assert normalise("  Hello \n  World ") == "hello world"
    texts = ["abc", "ABC ", "", "abcdefghij", "abd", "abc", "zz"]
    done = [True, True, True, True, False, True, True]
    assert filter_samples(texts, done, min_chars=1, max_chars=5) == [
        None, "duplicate", "too_short", "too_long", None, "duplicate", None]
    assert filter_samples(texts, done, min_chars=1, max_chars=5, dedup=False, require_finished=True) == [
        None, None, "too_short", "too_long", "unfinished", None, None]


def _files():
    return {"samples": io.StringIO(), "sft": io.StringIO(), "preference": io.StringIO()}


def _lines(f):
    return [json.loads(x) for x in f.getvalue().splitlines()]


def test_best_worst_selection_ties_singles_and_min_score():
    stats, files, alls, bests = SynthesisStats(), _files(), [], []
    kw = dict(min_score=0.5, min_chars=1, max_chars=None, dedup=True, require_finished=False, all_scores=alls,
              best_scores=bests)
    prompt = [{"role": "user", "content": "reverse: abc"}]
    # Prompt 1: best 0.9 (sample 2), worst 0.1 (sample 0); sample 3 duplicates sample 1.
    write_prompt_samples(files, stats, {"prompt": prompt, "answer": "cba"}, prompt, ["x", "cb", "cba", "CB"],
                  np.array([0.1, 0.6, 0.9, 0.6]), np.ones(4, bool), **kw)
    # Prompt 2: all scores equal -> SFT row below min_score? no (0.7 >= 0.5); pair skipped as a tie.
    write_prompt_samples(files, stats, {"prompt": "p2"}, "p2", ["a", "b"], np.array([0.7, 0.7]), np.ones(2, bool), **kw)
    # Prompt 3: one survivor (the other is empty) with a low score.
    write_prompt_samples(files, stats, {"prompt": "p3"}, "p3", ["a", ""], np.array([0.2, 0.9]), np.ones(2, bool), **kw)
    sft, pref, samples = _lines(files["sft"]), _lines(files["preference"]), _lines(files["samples"])
    assert sft[0] == {"messages": prompt + [{"role": "assistant", "content": "cba"}], "score": 0.9}
    assert sft[1] == {"prompt": "p2", "completion": "a", "score": 0.7}
    assert len(sft) == 2 and stats.sft_below_min_score == 1
    assert pref == [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "cba"}],
                     "rejected": [{"role": "assistant", "content": "x"}], "chosen_score": 0.9,
                     "rejected_score": 0.1, "margin": pytest.approx(0.8)}]
    assert (stats.pairs, stats.pairs_skipped_tie, stats.pairs_skipped_single) == (1, 1, 1)
    assert (stats.samples, stats.kept, stats.duplicate, stats.too_short) == (8, 6, 1, 1)
    assert [s["drop_reason"] for s in samples] == [None, None, None, "duplicate", None, None, None, "too_short"]
    assert samples[0]["answer"] == "cba" and samples[7]["score"] == 0.9  # dropped samples keep their score
    assert bests == [0.9, 0.7, 0.2] and len(alls) == 8


def _synth_files(out, conversational):
    stats, alls, bests = SynthesisStats(), [], []
    out.mkdir()
    paths = {k: out / f"{k}.jsonl" for k in ("samples", "sft", "preference")}
    files = {k: p.open("w") for k, p in paths.items()}
    for w in ["abc", "dce", "fgh", "hab"]:
        prompt = [{"role": "user", "content": f"reverse: {w}"}] if conversational else f"reverse: {w}"
        write_prompt_samples(files, stats, {"prompt": prompt}, prompt, [w[::-1], w, w[:2]], np.array([1.0, 0.2, 0.1]),
                      np.ones(3, bool), min_score=None, min_chars=1, max_chars=None, dedup=True,
                      require_finished=False, all_scores=alls, best_scores=bests)
    for f in files.values():
        f.close()
    return paths


@pytest.mark.parametrize("conversational", [False, True])
def test_outputs_load_into_sft_reward_and_dpo_pipelines(tmp_path, conversational):
    tok = build_tokenizer(None, vocab_size=261)
    paths = _synth_files(tmp_path / "out", conversational)
    b = next(make_lm_pipeline(load_rows(str(paths["sft"])), tok, 128, 4, packing=False, shuffle=False, num_epochs=1))
    assert (b["loss_mask"].sum(-1) > 0).all()  # every best completion is trained on
    pb = next(make_preference_pipeline(load_rows(str(paths["preference"])), tok, 128, 4, shuffle=False, num_epochs=1))
    np.testing.assert_allclose(pb["margin"], [0.9] * 4)  # reward-model margins ride along
    assert (pb["chosen_loss_mask"].sum(-1) > 0).all() and (pb["rejected_loss_mask"].sum(-1) > 0).all()
    assert len(load_rows(str(paths["samples"]))) == 12


@pytest.mark.slow
def test_best_of_n_beats_single_samples_and_sft_on_it_raises_reward(tmp_path):
    task = make_task(tmp_path, n_sft=400, n_pref=8, n_prompts=96, n_eval=32)
    sft = lambda run, data, steps, extra=(): run_task("sft", [
        f"sft.run_dir = '{run}'", f"sft.train_data = '{data}'", f"sft.tokenizer = '{task['tokenizer']}'",
        "sft.seq_len = 128", "sft.batch_size = 16", f"LoopConfig.num_steps = {steps}", "LoopConfig.log_every = 10",
        *extra])
    # A policy that has partly learnt the task, so best-of-N has right answers to pick.
    sft(tmp_path / "policy", task["sft"], 250, ["make_optimizer.learning_rate = 3e-3", "make_optimizer.warmup_steps = 20"])
    if "reversal" not in REWARDS:  # the CLI picks rewards by registered name
        register_reward("reversal")(reversal_reward)
    policy = tmp_path / "policy" / "final"
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)

    # 32 prompts x 16 samples per evaluation: the mean reward's standard error is ~0.015, so a rise of 0.05
    # is not a sampling accident (with 4 samples per prompt the error is about twice as large, and the
    # rise is at the mercy of tiny numerical changes).
    def mean_reward(model_dir, out):
        return synthesize(model_dir=str(model_dir), tokenizer=str(task["tokenizer"]), prompts=str(task["eval_prompts"]),
                          out_dir=str(out), n_samples=16, sampling=sampling, scorer=reversal_reward,
                          mode="best_of_n")["mean_score_all"]

    before = mean_reward(policy, tmp_path / "eval_before")
    assert synthesize_main(["--model", str(policy), "--tokenizer", str(task["tokenizer"]), "--prompts",
                            str(task["prompts"]), "--out", str(tmp_path / "syn"), "--n", "8", "--mode", "all",
                            "--reward", "reversal", "--max_new_tokens", "12", "--min_score", "0.1"]) == 0
    stats = json.loads((tmp_path / "syn" / "stats.json").read_text())
    assert stats["prompts"] == 96 and stats["samples"] == 96 * 8
    assert stats["mean_score_best"] > stats["mean_score_all"] + 0.05, stats
    assert stats["sft_rows"] + stats["sft_below_min_score"] + stats["prompts_without_samples"] == 96
    assert stats["sft_rows"] >= 8, stats
    sft_rows = [json.loads(x) for x in (tmp_path / "syn" / "sft.jsonl").read_text().splitlines()]
    assert all(r["score"] >= 0.1 for r in sft_rows)
    sft(tmp_path / "bon", tmp_path / "syn" / "sft.jsonl", 60,
        [f"sft.init_from = '{policy}'", "make_optimizer.learning_rate = 5e-4"])
    after = mean_reward(tmp_path / "bon" / "final", tmp_path / "eval_after")
    assert after > before + 0.05, (before, after)


def test_prompts_among_the_outputs_are_refused(tmp_path, monkeypatch, capsys):
    from jaxpost.cli import main
    from jaxpost.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    prompts = tmp_path / "data" / "sft.jsonl"
    prompts.write_text('{"prompt": "reverse: ab"}\n')
    # Checked before the model loads (there is only its outline here: the flags' directories are found first).
    (tmp_path / "no_model").mkdir()
    (tmp_path / "no_model" / "config.json").write_text("{}")
    (tmp_path / "no_model" / "tokenizer.json").write_text("{}")
    assert main(["synthesize", "--model", "no_model", "--prompts", "data/sft.jsonl", "--out", "./data/",
                 "--reward", "exact_match"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpost: error: prompts data/sft.jsonl is the output sft.jsonl") and err.count("\n") == 1
    with pytest.raises(UserError, match="is the output samples.jsonl"):
        synthesize(model_dir="no_model", prompts=str(tmp_path / "data" / "samples.jsonl"), out_dir="data",
                   scorer=reversal_reward, mode="pairs")
    assert prompts.read_text() == '{"prompt": "reverse: ab"}\n'


def test_a_failed_run_leaves_the_old_outputs_and_relative_out_dirs_work(tmp_path, monkeypatch):
    from jaxpost.models import ModelConfig, create, save_hf

    monkeypatch.chdir(tmp_path)
    build_tokenizer(None, vocab_size=261).save_pretrained(tmp_path / "tok")
    config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    save_hf(tmp_path / "model", config, create(config, seed=0)[1])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "reverse: ab"}\n{"prompt": "reverse: cd"}\n')
    out = tmp_path / "out"
    out.mkdir()
    for name in ("samples.jsonl", "sft.jsonl", "preference.jsonl", "stats.json"):
        (out / name).write_text(f"old {name}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def dies_on_second_batch(prompts, completions, **_):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("scorer died")
        return [float(len(c)) for c in completions]

    kw = dict(model_dir="model", tokenizer="tok", prompts="prompts.jsonl", out_dir="out", n_samples=2,
              sampling=SamplingConfig(max_new_tokens=3), mode="all", batch_size=1, max_prompt_len=16, min_chars=0)
    with pytest.raises(RuntimeError, match="scorer died"):
        synthesize(scorer=dies_on_second_batch, **kw)
    # The first batch was written before the failure, to temporary files that are gone now.
    assert len(calls) == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before

    stats = synthesize(scorer=lambda prompts, completions, **_: [float(len(c)) for c in completions], **kw)
    assert stats["prompts"] == 2 and sorted(p.name for p in out.iterdir()) == sorted(before)
    assert len(load_rows(str(out / "samples.jsonl"))) == 4
    assert json.loads((out / "stats.json").read_text()) == stats
