"""`jaxpost train` from the user's side: --help, --list_keys, one-paragraph errors, run gins, plug-in rewards,
and no gin binding silently ignored. Nothing here trains: runs stop right after their configs are resolved."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import gin
import gin.config as gin_config
import pytest

from jaxpost import cli, config, keys, recipes
from jaxpost.errors import UserError
from pipeline_utils import make_task

REPO = Path(__file__).resolve().parents[1]
DEMO_SFT = "configs/experiments/demo/sft.gin"
RUN_GINS = sorted((REPO / "configs" / "runs").glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
    config.register_configurables()
    gin.clear_config()
    yield
    gin.clear_config()


def _main(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- --help and --list_keys -----------------------------------------------------------------------------------------

def test_train_help_exits_0_and_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--gin_file", "--gin.KEY=VALUE", "--list_keys", "--import", "--debug"):
        assert flag in out, flag


def test_list_keys_of_the_demo_sft_run(capsys):
    # The demo's data and tokenizer do not exist here: listing must load nothing.
    rc, out, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", "--list_keys")
    assert rc == 0, err
    assert out.index("Required") < out.index("Optional")
    required, optional = out.split("Optional", 1)
    assert "  sft.run_dir: str = REQUIRED  <- 'runs/demo/sft'" in required
    assert "  sft.train_data: str = REQUIRED  <- 'runs/demo/data/sft.jsonl'" in required
    assert "LoopConfig.num_steps" not in required
    # Type, default and the value the gin file binds; the run's sub-configurables are followed.
    assert re.search(r"^  LoopConfig\.num_steps: int( \| None)? = (100|None)  <- 400$", optional, re.M)
    assert "  make_optimizer.learning_rate: float = 1e-05  <- 0.003" in optional
    assert re.search(r"^  sft\.loop: LoopConfig \| None = None  <- @LoopConfig\(\)$", optional, re.M)
    for key in ("ModelConfig.hidden_size:", "LoraConfig.rank:", "make_mesh.fsdp:", "Partitioner.rules:",
                "compilation_cache.cache_dir:", "sft.chunk_size:"):
        assert f"  {key}" in optional, key
    # A key passed explicitly at every call (make_sft_loss's chunk_size) is not the user's to bind.
    assert "make_sft_loss.chunk_size" not in out
    # Docs come from dataclass field comments and from docstrings.
    assert re.search(r"LoopConfig\.steps_per_call: int = 1\n      optimizer steps per compiled call", optional)
    assert re.search(r"Partitioner\.rules: .*\n      a preset name from ``PRESETS``", optional)


def test_list_keys_of_a_run_gin_shows_unset_required_keys_and_the_methods_defaults(capsys):
    rc, out, err = _main(capsys, "train", "--gin_file=configs/runs/grpo.gin", "--list_keys")
    assert rc == 0, err
    required = out.split("Optional", 1)[0]
    for key in ("grpo.run_dir", "grpo.train_data", "grpo.init_from"):
        assert re.search(rf"^  {re.escape(key)}: .* <- NOT SET$", required, re.M), key
    # Reward names are optional there: a reward model may score instead (make_scorer.reward_model).
    assert re.search(r"^  make_reward.names: .* <- \[\]$", out.split("Optional", 1)[1], re.M)
    # grpo builds RolloutConfig with group_size=8 unless gin binds it: the listing says so.
    assert "  RolloutConfig.group_size: int = 8 (grpo's default)  <- 8" in out


def test_the_gspo_run_file_is_the_grpo_run_with_sequence_ratios(capsys):
    rc, out, err = _main(capsys, "train", "--gin_file=configs/runs/gspo.gin", "--list_keys")
    assert rc == 0, err
    for line in ("make_grpo_loss.ratio_level: str = 'token'  <- 'sequence'",
                 "make_grpo_loss.clip_eps_low: float = 0.2  <- 0.0003",
                 "make_grpo_loss.aggregation: str = 'sequence'  <- 'sequence'", "grpo.run_dir: str = REQUIRED  <- NOT SET"):
        assert f"  {line}\n" in out, line


def test_list_keys_shows_the_parameters_of_the_chosen_dpo_loss(capsys):
    # make_dpo_loss takes them in **hparams: the listing follows `kind` to the loss they are passed on to.
    rc, out, err = _main(capsys, "train", "--gin_file=configs/runs/dpo.gin", "--gin.make_dpo_loss.kind='simpo'",
                         "--gin.make_dpo_loss.gamma=0.7", "--list_keys")
    assert rc == 0, err
    assert "  make_dpo_loss.gamma: float = 0.5  <- 0.7\n      passed on to simpo_loss" in out
    assert "  make_dpo_loss.label_smoothing: float = 0.0\n" in out and "make_dpo_loss.rpo_alpha" not in out
    gin.clear_config()
    rc, out, _ = _main(capsys, "train", "--gin_file=configs/runs/dpo.gin", "--list_keys")  # kind = 'sigmoid'
    assert rc == 0 and "  make_dpo_loss.rpo_alpha: float | None = None\n" in out and "gamma" not in out
    gin.clear_config()
    rc, out, _ = _main(capsys, "train", "--gin_file=configs/runs/dpo.gin", "--gin.make_dpo_loss.kind='x'",
                       "--list_keys")
    assert rc == 0 and "make_dpo_loss.kind: str | list[str] = 'sigmoid'  <- 'x'" in out  # the run itself refuses it
    gin.clear_config()
    # A sum of losses: the keys of each, each documented by the loss it goes to.
    rc, out, _ = _main(capsys, "train", "--gin_file=configs/runs/dpo.gin",
                       "--gin.make_dpo_loss.kind=['simpo', 'discopop']", "--list_keys")
    assert rc == 0 and "  make_dpo_loss.gamma: float = 0.5\n      passed on to simpo_loss" in out
    assert "  make_dpo_loss.discopop_tau: float = 0.05\n      passed on to discopop_loss" in out
    assert "  make_dpo_loss.loss_weights: list[float] | None = None\n" in out
    gin.clear_config()
    # A key two losses take: both named, each with the default it uses when unbound.
    rc, out, _ = _main(capsys, "train", "--gin_file=configs/runs/dpo.gin",
                       "--gin.make_dpo_loss.kind=['sigmoid', 'exo_pair']", "--list_keys")
    assert rc == 0 and ("  make_dpo_loss.label_smoothing: float = 0.0 (sigmoid_loss), 0.001 (exo_pair_loss)\n"
                        "      passed on to sigmoid_loss, exo_pair_loss") in out


# --- errors: one paragraph, fast, traceback only with --debug ---------------------------------------------------------

BAD_TYPE = ["train", f"--gin_file={DEMO_SFT}", "--gin.LoopConfig.num_steps=abc"]


def test_a_wrongly_typed_value_is_one_fast_paragraph(capsys):
    start = time.perf_counter()
    rc, out, err = _main(capsys, *BAD_TYPE)
    elapsed = time.perf_counter() - start
    assert rc == 2 and out == ""
    assert err.startswith("jaxpost: error: LoopConfig.num_steps: expected int")
    assert "got 'abc'" in err and "--gin.LoopConfig.num_steps=" in err  # where and how to fix
    assert err.count("\n") == 1 and "Traceback" not in err
    assert elapsed < 1.0, elapsed  # checked after parsing, before anything is loaded


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(capsys, monkeypatch, how):
    argv = BAD_TYPE + ["--debug"] if how == "flag" else BAD_TYPE
    if how == "env":
        monkeypatch.setenv("JAXPOST_DEBUG", "1")
    rc, _, err = _main(capsys, *argv)
    assert rc == 2
    assert "Traceback (most recent call last)" in err and "check_bindings" in err
    assert err.rstrip().splitlines()[-1].startswith("jaxpost: error: LoopConfig.num_steps: expected int")


@pytest.mark.parametrize("argv,expected", [
    (["--gin.LoopConfig.num_stepz=3"], "unknown or invalid key: LoopConfig.num_stepz"),
    (["--gin.SamplingConfig.stop_token_ids=(1, 'x')"], "SamplingConfig.stop_token_ids: expected tuple[int, ...]"),
    (["--gin.sft.model=3"], "sft.model: expected ModelConfig | None, got 3"),
    (["--gin_file=configs/runs/nope.gin"], "gin file not found: configs/runs/nope.gin"),
    (["--import", "no_such_plugin_module"], "--import 'no_such_plugin_module': no module named"),
])
def test_user_errors_name_the_key_or_path(capsys, argv, expected):
    rc, _, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", *argv)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("jaxpost: error: ") and expected in err, err


@pytest.mark.parametrize("binding,suggestion", [
    ("LoopConfig.num_stepz", "did you mean LoopConfig.num_steps?"),  # a typo of one of its own keys
    ("sft.learning_rate", "did you mean make_optimizer.learning_rate?"),  # the key lives elsewhere (and not
    ("sft.lerning_rate", "did you mean make_optimizer.learning_rate?"),   # make_schedule's: make_optimizer passes it)
    ("LoopConfig.save_evry", "did you mean LoopConfig.save_every or OnlineConfig.save_every?"),
    ("LoopConfg.num_steps", "did you mean LoopConfig?"),
    ("make_reward.name", "did you mean make_optimizer.name or make_reward.names?"),
    ("sft.xyzzy", "check the spelling:"),  # nothing close: no guess
])
def test_an_unknown_key_suggests_the_keys_it_may_mean(capsys, binding, suggestion):
    rc, _, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", f"--gin.{binding}=3")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"= 3; {suggestion} `jaxpost train --gin_file=... --list_keys` lists every key the run reads" in err, err


def test_an_unset_required_key_is_named_before_the_run_starts(capsys, tmp_path):
    # With the three keys sft.gin requires the run starts, and the first thing it checks (the data, by other
    # code) is again one paragraph: a UserError from inside the gin-wrapped run, without gin's call trail.
    rc, _, err = _main(capsys, "train", "--gin_file=configs/runs/sft.gin", f"--gin.sft.run_dir={tmp_path / 'run'}",
                       f"--gin.sft.train_data={tmp_path / 'y.jsonl'}", f"--gin.sft.init_from={tmp_path / 'z'}")
    assert rc == 2 and err.startswith("jaxpost: error: ") and err.count("\n") == 1, err
    assert "required key" not in err and "In call to configurable" not in err
    rc, _, err = _main(capsys, "train", "--gin_file=configs/runs/sft.gin", "--gin.sft.run_dir=x")
    assert rc == 2 and "required key sft.train_data is not set" in err and "--gin.sft.train_data=" in err
    # Without a run gin: gin.REQUIRED parameters of the method are checked before it is called.
    rc, _, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", "--gin.sft.train_data=%gin.REQUIRED")
    assert rc == 2 and "sft.train_data" in err


@pytest.mark.parametrize("argv,expected", [
    (["--gin_file=configs/runs/distill.gin", "--gin.distill.mode='on_policy'"],
     "distill.mode='on_policy' trains on the student's own samples, where a hard-label term would imitate the "
     "student itself: set distill.alpha = 1.0 (got 0.9)"),
    (["--gin_file=configs/runs/distill.gin", "--gin.distill.mode='online'"], "distill.mode='online' is unknown"),
])
def test_a_wrong_combination_of_values_is_one_paragraph_naming_the_key(capsys, tmp_path, argv, expected):
    rc, _, err = _main(capsys, "train", *argv, f"--gin.distill.run_dir={tmp_path / 'run'}",
                       f"--gin.distill.train_data={tmp_path / 'x.jsonl'}", f"--gin.distill.teacher_from={tmp_path}",
                       f"--gin.distill.init_from={tmp_path}")
    assert rc == 2 and err.startswith("jaxpost: error: ") and err.count("\n") == 1, err
    assert expected in err and "In call to configurable" not in err, err


@pytest.mark.parametrize("binding,expected", [
    ("--gin.RolloutConfig.temperature=-1.0", "RolloutConfig.temperature must be >= 0 (0 = greedy), got -1.0"),
    ("--gin.RolloutConfig.top_p=1.5", "RolloutConfig.top_p must be in (0, 1] (1 = off), got 1.5"),
    ("--gin.RolloutConfig.min_p=-0.1", "RolloutConfig.min_p must be in [0, 1] (0 = off), got -0.1"),
    ("--gin.OnlineConfig.min_delta=-1.0", "OnlineConfig.min_delta must be >= 0, got -1.0"),
    ("--gin.RolloutConfig.repetition_penalty=0.0",
     "RolloutConfig.repetition_penalty must be > 0 (1 = off; above 1 discourages repeats), got 0.0"),
    ("--gin.OnlineConfig.eval_every=2", "OnlineConfig.eval_every=2 (best_metric=None) evaluates held-out prompts, "
     "but grpo.eval_data is None: set it to a prompt file, or set OnlineConfig.eval_every = 0"),
])
def test_a_rollout_value_out_of_range_names_the_rollout_key(capsys, tmp_path, binding, expected):
    # The sampler's own config checks the same values; the message names the key the user bound.
    rc, _, err = _main(capsys, "train", "--gin_file=configs/experiments/demo/grpo.gin",
                       f"--gin.grpo.run_dir={tmp_path / 'run'}", binding)
    assert rc == 2 and err.startswith("jaxpost: error: ") and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("binding,expected", [
    ("--gin.make_optimizer.schedule='cosin'", "make_optimizer.schedule='cosin' is unknown; choose 'cosine'"),
    ("--gin.make_optimizer.learning_rate=-0.001", "make_optimizer.learning_rate must be >= 0, got -0.001"),
    ("--gin.make_optimizer.name='adam'", "make_optimizer.name='adam' is unknown"),
    ("--gin.LoopConfig.log_every=0", "LoopConfig.log_every must be >= 1, got 0"),
    ("--gin.LoopConfig.save_every=-5", "LoopConfig.save_every must be >= 0, got -5"),
    ("--gin.sft.batch_size=0", "sft.batch_size must be an int >= 1, got 0"),
    ("--gin.sft.eval_fraction=1.0", "sft.eval_fraction must be None or in (0, 1), got 1.0"),
    ("--gin.sft.seq_len=-8", "sft.seq_len must be an int >= 1, got -8"),
    ("--gin.ModelConfig.remat='ful'", "ModelConfig.remat must be one of 'none', 'full', 'save_dots', got 'ful'"),
    ("--gin.ModelConfig.num_layers=0", "ModelConfig.num_layers must be an int >= 1, got 0"),
    ("--gin.ModelConfig.dtype='bf16'", "ModelConfig.dtype must be one of 'float32', 'bfloat16', 'float16', got 'bf16'"),
    ("--gin_file=configs/algorithms/lora.gin --gin.LoraConfig.rank=0", "LoraConfig.rank must be an int >= 1, got 0"),
    # A fresh model that no Hugging Face class holds would train to the end, then fail to export final/.
    ("--gin.ModelConfig.qk_norm=True", "ModelConfig.qk_norm=True does not fit ModelConfig.architecture='llama': the "
     "Hugging Face Llama model a run exports has no qk norm; set ModelConfig.architecture = 'qwen3'"),
])
def test_a_value_out_of_range_is_one_paragraph_naming_the_key(capsys, tmp_path, binding, expected):
    task = make_task(tmp_path, n_sft=16, n_pref=4, n_prompts=4, n_eval=4)
    rc, _, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", f"--gin.sft.train_data={task['sft']}",
                       f"--gin.sft.tokenizer={task['tokenizer']}", f"--gin.sft.run_dir={tmp_path / 'run'}",
                       *binding.split())
    last = err.strip().splitlines()[-1]  # above it, `datasets` may have drawn its progress bar
    assert rc == 2 and last.startswith("jaxpost: error: ") and expected in last and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


_REQUIRED_EXTRAS = {"grpo": ["--gin.make_reward.names=['my_rewards:exact']"],
                    "ppo": ["--gin.make_scorer.reward_model='rm'"],
                    "online_dpo": ["--gin.make_scorer.reward_model='rm'"],
                    "distill": ["--gin.distill.teacher_from='teacher'"]}


@pytest.mark.parametrize("task,bindings,expected", [
    ("dpo", ["--gin.make_dpo_loss.kind='sigmod'"],
     "make_dpo_loss.kind must be one of 'sigmoid', 'robust', 'hinge', 'ipo', 'simpo', 'orpo', 'exo_pair', 'nca_pair', "
     "'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft', "
     "got 'sigmod'"),
    ("dpo", ["--gin.make_dpo_loss.label_smothing=0.1"],
     "make_dpo_loss.label_smothing is not a parameter of the 'sigmoid' loss; it takes make_dpo_loss.beta, "
     "make_dpo_loss.label_smoothing, make_dpo_loss.rpo_alpha, make_dpo_loss.f_divergence_type, "
     "make_dpo_loss.f_alpha_divergence_coef"),
    ("dpo", ["--gin.make_dpo_loss.kind=['sigmoid', 'nca']"],
     "make_dpo_loss.kind must be one of 'sigmoid', 'robust', 'hinge', 'ipo', 'simpo', 'orpo', 'exo_pair', 'nca_pair', "
     "'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft' "
     "(each entry of the list), got 'nca'"),
    ("dpo", ["--gin.make_dpo_loss.kind=['sigmoid', 'bco_pair']", "--gin.make_dpo_loss.loss_weights=[1.0]"],
     "make_dpo_loss.loss_weights must be one weight per entry of make_dpo_loss.kind (2), got [1.0]"),
    ("dpo", ["--gin.make_dpo_loss.kind=['sigmoid', 'sft']", "--gin.make_dpo_loss.gamma=0.5"],
     "make_dpo_loss.gamma is not a parameter of any of the losses ['sigmoid', 'sft']; they take make_dpo_loss.beta, "
     "make_dpo_loss.label_smoothing, make_dpo_loss.rpo_alpha, make_dpo_loss.f_divergence_type, "
     "make_dpo_loss.f_alpha_divergence_coef"),
    ("dpo", ["--gin.make_dpo_loss.kind='exo_pair'", "--gin.make_dpo_loss.label_smoothing=0.0"],
     "make_dpo_loss (kind='exo_pair'): exo_pair loss needs 0 < label_smoothing < 1.0, got 0.0"),
    ("dpo", ["--gin.make_dpo_loss.kind='bco_pair'", "--gin.make_dpo_loss.f_divergence_type='js_divergence'"],
     "make_dpo_loss.f_divergence_type is not a parameter of the 'bco_pair' loss; it takes make_dpo_loss.beta"),
    ("dpo", ["--gin.make_dpo_loss.f_divergence_type='jsd'"],
     "make_dpo_loss (kind='sigmoid'): sigmoid loss: f_divergence_type must be one of 'reverse_kl', 'forward_kl', "
     "'js_divergence', 'alpha_divergence', got 'jsd'"),
    ("dpo", ["--gin.make_dpo_loss.kind='simpo'", "--gin.make_dpo_loss.label_smoothing=1.5"],
     "make_dpo_loss (kind='simpo'): simpo loss needs 0 <= label_smoothing < 1.0, got 1.5"),
    ("dpo", ["--gin.make_dpo_loss.beta=0.0"], "make_dpo_loss.beta must be > 0, got 0.0"),
    ("dpo", ["--gin.make_dpo_loss.ld_alpha=1.5"], "make_dpo_loss.ld_alpha must be None (off) or in [0, 1] (1: plain "
     "sums), got 1.5"),
    ("dpo", ["--gin.ReferenceSync.every=4", "--gin.ReferenceSync.alpha=0.0"],
     "ReferenceSync.alpha must be in (0, 1], got 0.0"),
    ("dpo", ["--gin.make_dpo_loss.kind=['sigmoid', 'aot']", "--gin.make_dpo_loss.use_weighting=True"],
     "make_dpo_loss.use_weighting must be False with 'aot', whose terms are sorted margins of no one pair (TRL "
     "refuses WPO there too), got True"),
    ("grpo", ["--gin.make_grpo_loss.aggregation='dr-grpo'"],
     "make_grpo_loss.aggregation must be one of 'sequence', 'token', 'dr_grpo', 'luspo', got 'dr-grpo'"),
    ("grpo", ["--gin.make_grpo_loss.ratio_level='seq'"],
     "make_grpo_loss.ratio_level must be one of 'token', 'sequence', got 'seq'"),
    ("grpo", ["--gin.make_grpo_loss.delta=1.1"],
     "make_grpo_loss.delta must be None (off) or > 1 + the upper clip range = 1.28, got 1.1"),
    ("grpo", ["--gin.make_grpo_loss.top_entropy_quantile=0.0"],
     "make_grpo_loss.top_entropy_quantile must be in (0, 1] (1 = every token), got 0.0"),
    ("grpo", ["--gin.make_grpo_loss.surrogate='gspo'"],
     "make_grpo_loss.surrogate must be one of 'clip', 'cispo', 'sapo', 'vespo', got 'gspo'"),
    ("grpo", ["--gin.make_grpo_loss.surrogate='vespo'", "--gin.make_grpo_loss.vespo_lambda_neg=0.0"],
     "make_grpo_loss.vespo_lambda_neg must be > 0, got 0.0"),
    ("grpo", ["--gin.make_grpo_loss.surrogate='sapo'", "--gin.make_grpo_loss.delta=4.0"],
     "make_grpo_loss.delta must be None with surrogate='sapo' (delta caps the clipped surrogate's ratio), got 4.0"),
    ("grpo", ["--gin.make_grpo_loss.off_policy_mask_threshold=0.0"],
     "make_grpo_loss.off_policy_mask_threshold must be None (off) or > 0, got 0.0"),
    ("grpo", ["--gin.make_grpo_loss.entropy_coef=-0.01"],
     "make_grpo_loss.entropy_coef must be >= 0 (0: no entropy bonus), got -0.01"),
    ("ppo", ["--gin.make_ppo_loss.clip_eps=1.5"], "make_ppo_loss.clip_eps must be in (0, 1), got 1.5"),
    ("grpo", ["--gin.OnlineConfig.best_metric='eval/score'"],
     "OnlineConfig.best_metric='eval/score' needs evaluations: set OnlineConfig.eval_every > 0 and give the run's "
     "eval_data (held-out prompts)"),
    ("online_dpo", ["--gin.OnlineConfig.export_best=True"],
     "OnlineConfig: export_best=True and patience=0 choose by an evaluation metric; set OnlineConfig.best_metric "
     "(e.g. 'eval/score') and eval_every"),
    ("ppo", ["--gin.OnlineConfig.best_metric='eval/score'", "--gin.OnlineConfig.eval_every=2",
             "--gin.OnlineConfig.best_mode='highest'"],
     "OnlineConfig.best_mode='highest': use 'min' (lower is better, e.g. eval/loss) or 'max' (e.g. eval/score)"),
    ("kto", ["--gin.make_kto_loss.loss_type='apo'"],
     "make_kto_loss.loss_type must be one of 'kto', 'apo_zero_unpaired', got 'apo'"),
    ("sft", ["--gin.make_optimizer.b2=1.0"], "make_optimizer.b2 must be in [0, 1), got 1.0"),
    ("grpo", ["--gin.grpo.num_iterations=0"], "grpo.num_iterations must be an int >= 1, got 0"),
    ("grpo", ["--gin.grpo.minibatch_size=0"],
     "grpo.minibatch_size must be an int >= 1 (None: all of a rollout's rows), got 0"),
    ("online_dpo", ["--gin.online_dpo.updates_per_round=0"], "online_dpo.updates_per_round must be an int >= 1, got 0"),
    ("ppo", ["--gin.ppo.lam=1.5"], "ppo.lam must be in [0, 1], got 1.5"),
    ("ppo", ["--gin.ppo.kl_estimator='k4'"], "ppo.kl_estimator must be one of 'k1', 'k2', 'k3', got 'k4'"),
    ("dpo", ["--gin.dpo.max_prompt_len=511"], "dpo.max_prompt_len must be in [1, dpo.seq_len - 2 = 510], got 511"),
    ("kto", ["--gin.kto.eval_fraction=0.0"], "kto.eval_fraction must be None or in (0, 1), got 0.0"),
    ("distill", ["--gin.distill.divergence='kl'"],
     "distill.divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', got 'kl'"),
    ("distill", ["--gin.distill.top_k=5", "--gin.distill.divergence='jsd'"],
     "distill.divergence must be 'forward_kl' with distill.top_k=5 (a top-k teacher supports only forward KL), "
     "got 'jsd'"),
])
def test_a_run_loss_or_optimizer_value_is_refused_before_anything_is_read(capsys, tmp_path, task, bindings, expected):
    # Neither the data nor the model exists: the error is the value's, found before either is looked at.
    run, missing = tmp_path / "run", tmp_path / "missing"
    rc, _, err = _main(capsys, "train", f"--gin_file=configs/runs/{task}.gin", f"--gin.{task}.run_dir={run}",
                       f"--gin.{task}.train_data={missing}.jsonl", f"--gin.{task}.init_from={missing}",
                       *_REQUIRED_EXTRAS.get(task, []), *bindings)
    assert rc == 2 and err == f"jaxpost: error: {expected}\n", err
    assert not run.exists()


@pytest.mark.parametrize("task,values,expected", [
    ("sft", dict(batch_size=0), "sft.batch_size must be an int >= 1, got 0"),
    ("dpo", dict(max_prompt_len=511), "dpo.max_prompt_len must be in [1, dpo.seq_len - 2 = 510], got 511"),
    ("kto", dict(eval_fraction=1.0), "kto.eval_fraction must be None or in (0, 1), got 1.0"),
    ("reward_model", dict(seq_len=0), "reward_model.seq_len must be an int >= 1, got 0"),
    ("grpo", dict(num_iterations=0), "grpo.num_iterations must be an int >= 1, got 0"),
    ("ppo", dict(lam=1.5), "ppo.lam must be in [0, 1], got 1.5"),
    ("online_dpo", dict(updates_per_round=0), "online_dpo.updates_per_round must be an int >= 1, got 0"),
    ("distill", dict(lmbda=1.5), "distill.lmbda must be in [0, 1] (the fraction of on-policy steps), got 1.5"),
    ("continual", dict(min_records=0), "continual.min_records must be >= 1, got 0"),
    ("synthesize", dict(batch_size=0), "synthesize.batch_size must be an int >= 1, got 0"),
])
def test_a_recipe_called_from_python_checks_its_values_first(tmp_path, task, values, expected):
    # The library path, no gin parse: the same one-line error as `jaxpost train`, before any path is looked at.
    fn = getattr(recipes, task)
    gin.clear_config()
    missing = str(tmp_path / "missing")
    required = {"synthesize": dict(model_dir=missing, prompts=missing, out_dir=missing),
                "continual": dict(run_dir=missing, feedback_dir=missing, init_from=missing, eval_data=missing)}
    kwargs = required.get(task, dict(run_dir=missing, train_data=missing))
    with pytest.raises(UserError) as raised:
        fn(**kwargs, **values)
    assert str(raised.value).splitlines()[0] == expected  # gin adds a line naming the configurable it called
    assert not (tmp_path / "missing").exists()


def test_check_values_gives_a_kwargs_check_only_what_the_configurable_collects_in_its_kwargs():
    # make_dpo_loss's own chunk_size is not one of the loss's parameters, and is not checked as one.
    import jaxpost.algorithms  # noqa: F401  (registers make_dpo_loss's check)
    config.check_values("make_dpo_loss", dict(kind="simpo", beta=2.0, chunk_size=64, gamma=0.5))
    with pytest.raises(UserError, match=r"^make_dpo_loss.label_smothing is not a parameter of the 'sigmoid' loss"):
        config.check_values("make_dpo_loss", dict(kind="sigmoid", beta=0.1, chunk_size=64, label_smothing=0.1))


def test_bound_values_are_checked_through_macros_and_scopes_with_the_defaults_filled_in():
    config.parse([], ["LR = -0.5", "make_optimizer.learning_rate = %LR"])
    with pytest.raises(UserError, match=r"^make_optimizer.learning_rate must be >= 0, got -0.5$"):
        config.check_bound_values()
    gin.clear_config()
    config.parse([], ["make_dpo_loss.kind = 'ipo'", "eval/make_dpo_loss.gamma = 0.5"])  # the scope inherits 'ipo'
    with pytest.raises(UserError, match=r"^make_dpo_loss.gamma is not a parameter of the 'ipo' loss"):
        config.check_bound_values()
    gin.clear_config()
    config.parse([], ["make_dpo_loss.kind = 'ipo'", "eval/make_dpo_loss.kind = 'simpo'",
                      "eval/make_dpo_loss.gamma = 1"])
    config.check_bound_values()
    gin.clear_config()
    for binding, message in (("continual.min_records = 0", "continual.min_records must be >= 1, got 0"),
                             ("synthesize.batch_size = 0", "synthesize.batch_size must be an int >= 1, got 0"),
                             ("distill.temperature = 0.0", "distill.temperature must be > 0, got 0.0")):
        gin.clear_config()
        config.parse([], [binding])
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            config.check_bound_values()
    gin.clear_config()
    config.parse([], ["continual.tolerance = -0.1"])  # a round must improve by 0.1: allowed
    config.check_bound_values()
    gin.clear_config()
    config.parse([], ["make_dpo_loss.kind = 'simpo'", "make_dpo_loss.gamma = 0.5", "make_dpo_loss.chunk_size = 64",
                      "make_optimizer.total_steps = 0"])  # the run, not the user, decides total_steps
    config.check_bound_values()


def test_a_binding_the_run_never_read_is_named_at_its_end(capsys, tmp_path):
    task = make_task(tmp_path, n_sft=16, n_pref=4, n_prompts=4, n_eval=4)
    # A gin file of the user's own is checked too (the shipped presets bind keys for many kinds of run).
    mine = tmp_path / "mine.gin"
    mine.write_text("LoopConfig.log_every = 1\nRolloutConfig.stop_token_ids = (\n    5,\n    6)\n")
    rc, _, err = _main(capsys, "train", f"--gin_file={DEMO_SFT}", f"--gin_file={mine}",
                       f"--gin.sft.train_data={task['sft']}",
                       f"--gin.sft.tokenizer={task['tokenizer']}", f"--gin.sft.run_dir={tmp_path / 'run'}",
                       "--gin.LoopConfig.num_steps=2", "--gin.LoopConfig.progress=False",
                       "--gin.SamplingConfig.temperature=0.5",  # SFT samples nothing
                       "--gin.OnlineConfig.save_every=5",  # an online run's key: SFT reads LoopConfig.save_every
                       "--gin.make_optimizer.learning_rate=0.01", "--on_config_change=allow")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("jaxpost: warning:")]
    assert len(warnings) == 1, err
    assert ("(run.task = @sft) never read --gin.SamplingConfig.temperature, --gin.OnlineConfig.save_every, "
            f"RolloutConfig.stop_token_ids (in {mine}): a mistyped or misplaced key, whose value changed nothing; "
            "it reads --gin.LoopConfig.save_every. ") in warnings[0]
    assert "log_every" not in warnings[0]


def test_config_error_is_a_user_error():
    assert issubclass(config.ConfigError, UserError) and issubclass(config.ConfigError, ValueError)


def test_the_installed_command_prints_one_paragraph(tmp_path):
    # The one subprocess run: what a user sees, from another directory, with the real entry point.
    proc = subprocess.run([sys.executable, "-m", "jaxpost", *BAD_TYPE[:1], f"--gin_file={REPO / DEMO_SFT}",
                           *BAD_TYPE[2:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert lines == [lines[-1]] and lines[-1].startswith("jaxpost: error: LoopConfig.num_steps: expected int")


# --- run gins ---------------------------------------------------------------------------------------------------------

def _run_gin_methods() -> set[str]:
    methods = set()
    for path in RUN_GINS:  # run.task may come from an included algorithm gin
        config.parse([str(path)], finalize=False)
        methods.add(cli._bound_task())
    return methods


@pytest.mark.parametrize("path", RUN_GINS, ids=[p.stem for p in RUN_GINS])
def test_run_gins_parse_with_their_required_keys_bound(path):
    config.parse([str(path)], finalize=False)
    required = [k for k in keys.run_keys() if k.required]
    unset = [k.name for k in required if not k.is_set]
    assert {"run_dir", "train_data"} & {n.split(".")[-1] for n in unset} or "synthesize.out_dir" in unset
    # T5X style: the required keys a run gin binds come before its defaults.
    text = path.read_text()
    if "# --- defaults" in text:
        head = text.split("# --- defaults", 1)[0]
        for name in unset:
            if re.search(rf"^{re.escape(name)} = ", text, re.M):
                assert re.search(rf"^{re.escape(name)} = %gin.REQUIRED", head, re.M), name
    bindings = [f"{n} = {['exact_match'] if n == 'make_reward.names' else repr('x')}" for n in unset]
    config.parse([str(path)], bindings)  # finalize: no %gin.REQUIRED left, every value type-checks
    cli._check_run_required()
    with pytest.raises(config.ConfigError, match=re.escape(unset[0])):
        config.parse([str(path)], bindings[1:])


def test_there_is_a_run_gin_per_method():
    assert {"sft", "dpo", "reward_model", "ppo", "grpo", "online_dpo", "distill", "synthesize"} <= _run_gin_methods()


# --- no gin binding silently ignored ----------------------------------------------------------------------------------

class _Resolved(Exception):
    """Raised inside a run right after its sub-configs are resolved (the run stops there)."""


def _sub_configs(fn) -> dict[str, type]:
    """Parameters of ``fn`` whose annotation is a gin-configurable dataclass (``loop: LoopConfig | None``)."""
    hints = config._type_hints(gin_config._inverse_lookup(fn, allow_decorators=True).wrapped)
    out = {}
    for name, tp in hints.items():
        for cls in keys._classes_in(tp):
            if dataclasses.is_dataclass(cls) and gin_config._inverse_lookup(cls) is not None:
                out[name] = cls
    return out


def _first_int_field(cls) -> str:
    return next(f.name for f in dataclasses.fields(cls) if f.type in ("int", int) and f.name != "group_size")


def _resolved_configs(fn, call) -> dict:
    """Calls ``call()`` and stops ``fn`` at its first line where every sub-config is built; returns those."""
    code = gin_config._inverse_lookup(fn, allow_decorators=True).wrapped.__code__
    wanted = _sub_configs(fn)
    seen: dict = {}

    def local(frame, event, arg):
        if event == "line" and all(isinstance(frame.f_locals.get(n), c) for n, c in wanted.items()):
            seen.update({n: frame.f_locals[n] for n in wanted})
            raise _Resolved
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        call()
    except _Resolved:
        pass
    finally:
        sys.settrace(previous)
    assert seen, f"{fn.__name__} ran on without ever building all of {sorted(wanted)}"
    return seen


def _run_task(task: str, extra: list[str]) -> dict:
    fn = gin_config._REGISTRY.get_match(task).wrapper
    config.parse([], [f"run.task = @{task}"], finalize=False)
    required = [k.name for k in keys.unset_required(fn)]
    config.parse([], [f"run.task = @{task}", *(f"{k} = 'unused'" for k in required), *extra])
    return _resolved_configs(fn, recipes.run)


@pytest.mark.parametrize("task", ["sft", "dpo", "reward_model", "ppo", "grpo", "online_dpo", "distill", "synthesize",
                                  "generate_to_jsonl"])
def test_bindings_of_sub_configs_reach_the_run_without_binding_the_parameter(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were a run not to stop, its relative paths land here
    fn = gin_config._REGISTRY.get_match(task).wrapper
    wanted = _sub_configs(fn)
    assert wanted, task
    # e.g. LoopConfig.num_steps = 103, never `sft.loop = @LoopConfig()`
    fields = {n: _first_int_field(c) for n, c in wanted.items()}
    values = {n: getattr(c(), fields[n]) + 3 for n, c in wanted.items()}
    bindings = [f"{wanted[n].__name__}.{fields[n]} = {values[n]}" for n in wanted]
    if task == "generate_to_jsonl":  # not a `run.task`: called with its positional arguments
        config.parse([], bindings)
        seen = _resolved_configs(fn, lambda: fn("model", "tok", "prompts.jsonl", "out.jsonl"))
    else:
        seen = _run_task(task, bindings)
    for n in wanted:
        assert getattr(seen[n], fields[n]) == values[n], (task, n)


@pytest.mark.parametrize("task,own_default", [("grpo", 8), ("online_dpo", 2)])
def test_a_runs_own_default_yields_to_a_binding(task, own_default, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ["ModelConfig.num_layers = 3"]  # so that `model` is built too and the run stops after resolving
    assert _run_task(task, model)["rollout"].group_size == own_default
    assert _run_task(task, [*model, "RolloutConfig.group_size = 3"])["rollout"].group_size == 3


# --- plug-in rewards --------------------------------------------------------------------------------------------------

PLUGIN = '''
from jaxpost.generate.rewards import register_reward


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


@register_reward("plugin_test_shout")
def shout(prompts, completions, **_):
    return [float(c.isupper()) for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    from jaxpost.generate import rewards

    (tmp_path / "my_rewards_plugin.py").write_text(PLUGIN)
    (tmp_path / "gin_rewards_plugin.py").write_text(PLUGIN.replace("plugin_test_shout", "plugin_test_gin"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file_rewards.py").write_text(PLUGIN.replace("plugin_test_shout", "plugin_test_shout2"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    registered, modules = dict(rewards.REWARDS), set(sys.modules)
    yield tmp_path
    rewards.REWARDS.clear()
    rewards.REWARDS.update(registered)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_a_reward_plugs_in_from_the_command_line(plugin_dir, capsys):
    from jaxpost.generate.rewards import get_reward
    from jaxpost.generate.scorers import make_scorer

    # --import registers the module's named rewards before the gin files are read.
    assert "plugin_test_shout" not in get_reward.__globals__["REWARDS"]
    rc, out, err = _main(capsys, "train", "--import", "my_rewards_plugin", "--gin_file=configs/runs/grpo.gin",
                         "--gin.make_reward.names=['plugin_test_shout']", "--list_keys")
    assert rc == 0, err
    assert "make_reward.names: " in out and "<- ['plugin_test_shout']" in out
    assert get_reward("plugin_test_shout")([""], ["HI"]) == [1.0]
    assert get_reward("my_rewards_plugin:exact")([""] * 2, ["4", "5"], answer=[4, 4]) == [1.0, 0.0]
    assert get_reward("sub/file_rewards.py:exact")([""], ["7"], answer=[7]) == [1.0]
    # As a run reads it: the GRPO run gin's reward source, with the spec bound the way the command line binds it.
    files, bindings, _ = config.split_gin_args(["--gin.make_reward.names=['my_rewards_plugin:exact']"])
    config.parse(["configs/runs/grpo.gin"], [*bindings, "grpo.run_dir='r'", "grpo.train_data='d'",
                                             "grpo.init_from='m'"])
    rollout = types.SimpleNamespace(prompts=["a", "b"], completions=["1", "2"], rows=[{"answer": 1}, {"answer": 1}])
    assert list(make_scorer(None)(rollout)) == [1.0, 0.0]
    # `import MODULE` in a gin file finds a module in the working directory.
    (plugin_dir / "mine.gin").write_text("import gin_rewards_plugin\nmake_reward.names = ['plugin_test_gin']\n")
    config.parse([str(plugin_dir / "mine.gin")])
    assert get_reward("plugin_test_gin")([""], ["x"]) == [0.0]


def test_reward_names_and_weights_are_checked_before_anything_loads(tmp_path, capsys):
    from jaxpost.generate.rewards import check_make_reward_values, make_reward

    run = ["train", "--gin_file=configs/runs/grpo.gin", f"--gin.grpo.run_dir='{tmp_path / 'g'}'",
           "--gin.grpo.train_data='no/data.jsonl'", "--gin.grpo.init_from='no/model'"]
    rc, _, err = _main(capsys, *run, "--gin.make_reward.names=['exact_match', 'nonexistent']")
    assert rc == 2 and err.startswith("jaxpost: error: make_reward.names: unknown reward 'nonexistent'; registered: [")
    rc, _, err = _main(capsys, *run, "--gin.make_reward.names=['exact_match']", "--gin.make_reward.weights=[1.0, 2.0]")
    assert rc == 2 and err == ("jaxpost: error: make_reward.weights has 2 values for the 1 rewards of "
                               "make_reward.names ['exact_match']; give one weight per name, or None for all 1\n")
    assert not (tmp_path / "g").exists()
    # A spec passes the bound-value check unimported (jaxpost plan runs it too); the run imports it first thing.
    check_make_reward_values(["my_module:fn"], [2.0])
    # [] passes it (configs/runs/grpo.gin binds it so, for a run a reward model scores) and builds a reward with
    # no parts (a run's scorer adds nothing for it), which refuses to be called (a synthesize scorer, say).
    check_make_reward_values([])
    empty = make_reward([], weights=None)
    assert empty.reward_parts == ()
    with pytest.raises(UserError) as raised:
        empty(prompts=["p"], completions=["c"])
    assert str(raised.value).splitlines()[0] == ("make_reward.names is []: name at least one reward (a registered "
                                                 "name such as 'exact_match', or 'module:function')")


@pytest.mark.parametrize("spec,message", [
    ("my_rewards_plugin:nope", "'my_rewards_plugin:nope': my_rewards_plugin has no attribute 'nope'"),
    ("my_rewards_plugin:NOT_A_FUNCTION", "is a int, not a function"),
    ("no_such_module_x:exact", "no module named 'no_such_module_x'"),
    ("sub/missing.py:exact", "no file"),
    ("not a spec", "unknown reward 'not a spec'"),
])
def test_a_bad_reward_spec_is_a_user_error_naming_it(plugin_dir, spec, message):
    from jaxpost.generate.rewards import get_reward

    with pytest.raises(UserError, match=re.escape(message)) as e:
        get_reward(spec)
    assert spec in str(e.value)
