"""``jaxpost`` command line: train | generate | synthesize | demo | plot.

    jaxpost train --gin_file=configs/experiments/demo/sft.gin --gin.LoopConfig.num_steps=50
    jaxpost generate --model runs/demo/sft/final --prompts prompts.jsonl --out samples.jsonl --n 4
    jaxpost synthesize --model runs/demo/sft/final --prompts prompts.jsonl --out data/ --n 8 --mode all --reward exact_match
    jaxpost demo [--out runs/demo] [--quick] [--resume] [--feedback | --tools]
    jaxpost plot runs/demo/sft [runs/demo/dpo ...] [--out curves.png]
    jaxpost plan --gin_file=configs/runs/sft.gin --gin_file=configs/models/llama3_2_1b.gin --devices 8 --device_kind h100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from typing import Any, Sequence

import gin

from jaxpost.errors import RunInterrupted, UserError


_TRAIN_EPILOG = """\
gin arguments (any number, in order; later ones win):
  --gin_file=FILE        a gin file (a path, or relative to the repository's configs/); repeatable
  --gin.KEY=VALUE        one binding, e.g. --gin.LoopConfig.num_steps=50 --gin.sft.run_dir=runs/my_sft
                         (a bare word is taken as a string; lists, numbers, None, @refs as in gin)

Plug-ins: --import my_rewards (a module in the current directory or on sys.path) or
--import path/to/my_rewards.py runs that file first, so what it registers (@gin.configurable,
@register_reward("name")) can be bound; a reward can also be named 'module:function' or
'path/to/file.py:function' directly, e.g. --gin.make_reward.names="['my_rewards:exact']".

examples:
  jaxpost train --gin_file=configs/runs/sft.gin --gin.sft.run_dir=runs/sft --gin.sft.train_data=data.jsonl \\
      --gin.sft.init_from=/path/to/hf_model
  jaxpost train --gin_file=configs/experiments/demo/sft.gin --list_keys
"""


def _train(argv: Sequence[str]) -> int:
    """``jaxpost train``: parse the gin files and bindings, check them, then run ``run.task``.

    A mistake in them (unknown key, wrong type, unset required key, missing
    file) raises :class:`jaxpost.errors.UserError` before anything is built
    or loaded; :func:`main` prints it as one paragraph and returns 2.
    ``--list_keys`` prints every key the run reads and returns 0 without
    running it.
    """
    from jaxpost import config

    files, bindings, rest = config.split_gin_args(argv)
    p = argparse.ArgumentParser(
        prog="jaxpost train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TRAIN_EPILOG,
        description="Runs one method (sft, dpo, reward_model, ppo, grpo, online_dpo, distill, synthesize) as\n"
                    "its gin files say: `run.task = @sft` picks it. configs/runs/*.gin: one per method.")
    p.add_argument("--gin_file", metavar="FILE", action="append", help="a gin file (see below); repeatable")
    p.add_argument("--list_keys", action="store_true",
                   help="print every key this run reads (required first) with its type, default, bound value and "
                        "doc, then exit without loading anything")
    p.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                   help="import MODULE (a module name or path/to/file.py) before reading the gin files; repeatable")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or JAXPOST_DEBUG=1)")
    p.add_argument("--resume_from_step", type=int, metavar="STEP", default=None,
                   help="resume from this checkpoint step instead of the newest (the later ones are moved to "
                        "RUN_DIR/abandoned_checkpoints/, not deleted): the way back after a NaN halt")
    p.add_argument("--on_config_change", choices=("refuse", "allow", "restart"), default=None,
                   help="when RUN_DIR holds a run started with other settings: refuse (default), allow (resume "
                        "with the new values) or restart (move the old run to RUN_DIR.previous-<time>, start over)")
    args = p.parse_args(rest)
    # Plain flags for what a user reaches for after a failure; they are ResumeConfig bindings, so the
    # operative config records them like any other key.
    if args.resume_from_step is not None:
        bindings.append(f"ResumeConfig.from_step = {args.resume_from_step}")
    if args.on_config_change is not None:
        bindings.append(f"ResumeConfig.on_config_change = {args.on_config_change!r}")
    if not files:
        p.error("at least one --gin_file is needed (e.g. --gin_file=configs/runs/sft.gin)")
    config.import_modules(args.imports)
    if args.list_keys:
        from jaxpost import keys

        config.parse(files, bindings, finalize=False)  # unset %gin.REQUIRED keys are listed, not refused
        task = _bound_task()
        title = (f"Keys of `jaxpost train` with run.task = @{task} (bind with --gin.KEY=VALUE; '<-' is the value "
                 f"your gin files and bindings give it):")
        print(keys.format_keys(keys.run_keys(), title), end="")
        return 0
    config.parse(files, bindings)
    _check_run_required()
    # Values a run would read only after its model loads (a recipe's sizes, the optimizer's, a loss's) are checked
    # now, on the bindings alone, so that a typo costs no load and leaves no run directory.
    config.check_bound_values()
    from jaxpost import distributed
    from jaxpost.compile_cache import compilation_cache

    distributed.initialize()
    compilation_cache()  # as bound in the gin files (compilation_cache.cache_dir = None turns it off)
    from jaxpost.recipes import run
    from jaxpost.train.run_dir import release_run_dirs

    try:
        summary = run()
    finally:
        release_run_dirs()  # before interpreter exit shuts down the storage clients the lock lives on
    if summary and distributed.is_main_process():
        print(json.dumps(summary, default=float))  # one line of JSON, as summary.json holds it: for scripts
    unread = [f"--gin.{k}" for k in config.unread_bindings(bindings)]
    unread += [f"{k} (in {f})" for f, lines in config.user_file_bindings(files).items()
               for k in config.unread_bindings(lines)]
    if unread and distributed.is_main_process():
        likely = list(dict.fromkeys(f"--gin.{k}" for key in unread
                                    for k in config.read_keys_like(key.split()[0].removeprefix("--gin."))))
        hint = f"; it reads {', '.join(likely)}" if likely else ""
        print(f"jaxpost: warning: this run (run.task = @{_bound_task()}) never read {', '.join(unread)}: a "
              f"mistyped or misplaced key, whose value changed nothing{hint}. "
              f"`jaxpost train --gin_file=... --list_keys` lists the keys the run reads", file=sys.stderr)
    return 0


def _bound_task() -> str | None:
    """The name ``run.task`` is bound to (``sft``), or None."""
    try:
        ref = gin.query_parameter("run.task")
    except ValueError:
        return None
    return getattr(getattr(ref, "configurable", None), "name", None)


def _check_run_required() -> None:
    # gin itself would only notice an unset required key when the run is called, with a RuntimeError.
    from jaxpost import keys
    from jaxpost.config import ConfigError

    try:
        task = gin.query_parameter("run.task")
    except ValueError:
        raise ConfigError("run.task is not set: a gin file must pick the method, e.g. `run.task = @sft` "
                          "(configs/runs/*.gin do; or add --gin.run.task=@sft)") from None
    missing = keys.unset_required(task.configurable.wrapped) if hasattr(task, "configurable") else []
    if missing:
        names = ", ".join(k.name for k in missing)
        flags = " ".join(f"--gin.{k.name}=..." for k in missing)
        raise ConfigError(f"required key{'s' if len(missing) > 1 else ''} {names} not set; add {flags} or bind "
                          f"{'them' if len(missing) > 1 else 'it'} in your gin file (--list_keys lists every key)")


def _generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxpost generate",
                                description="Sample completions for a prompt file (jsonl with 'prompt') to jsonl.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. RUN_DIR/final)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="jsonl with a 'prompt' field (text or messages)")
    p.add_argument("--out", required=True, help="output jsonl: prompt, completion, sample_index + input fields")
    p.add_argument("--n", type=_int_from(1), default=1, help="samples per prompt")
    _sampling_flags(p, max_new_tokens=256)
    p.add_argument("--batch_size", type=_int_from(1), default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from jaxpost import distributed
    from jaxpost.compile_cache import compilation_cache
    from jaxpost.generate import generate_to_jsonl

    _find_model_flags(args.model, args.tokenizer)
    distributed.initialize()
    compilation_cache()
    sampling = _sampling_config(args)
    # A UserError (bad prompts, --out equal to --prompts...) reaches main(): one line on stderr, exit 2.
    n = generate_to_jsonl(args.model, args.tokenizer or args.model, args.prompts, args.out, sampling,
                          n_samples_per_prompt=args.n, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {n} completions to {args.out}")
    return 0


def _find_model_flags(model: str, tokenizer: str | None, reward_model: str | None = None) -> None:
    """Finds the directories ``--model``, ``--tokenizer`` and ``--reward_model`` name before any weight is read.

    A missing one (a typo, a run directory given for its ``final/``) is a
    :class:`~jaxpost.errors.UserError` naming the flag as the user typed it.
    """
    from jaxpost.hub import resolve_model_dir, resolve_tokenizer_dir

    resolve_model_dir(model, key="--model")
    resolve_tokenizer_dir(tokenizer or model, key="--tokenizer" if tokenizer else "--model")
    if reward_model is not None:
        resolve_model_dir(reward_model, key="--reward_model")


def _int_from(low: int):
    """An argparse type: an int >= ``low`` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-number reads "invalid int value"
    return parse


def _float_where(ok, rule: str):
    """An argparse type: a float for which ``ok(value)`` holds, ``rule`` saying which."""
    def parse(text: str) -> float:
        value = float(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    parse.__name__ = "float"
    return parse


def _sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max_new_tokens", type=_int_from(1), default=max_new_tokens)
    p.add_argument("--temperature", type=_float_where(lambda v: v >= 0, ">= 0"), default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=_int_from(0), default=0, help="0 = off")
    p.add_argument("--top_p", type=_float_where(lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0, help="1 = off")
    p.add_argument("--min_p", type=_float_where(lambda v: 0 <= v <= 1, "in [0, 1]"), default=0.0,
                   help="keep tokens at least min_p times as likely as the top one; 0 = off")
    p.add_argument("--repetition_penalty", type=_float_where(lambda v: v > 0, "> 0"), default=1.0,
                   help="divide a positive logit (multiply a negative one) of every token already in the prompt "
                        "or the completion by this; 1 = off")


def _sampling_config(args: argparse.Namespace):
    """The :class:`~jaxpost.generate.SamplingConfig` of :func:`_sampling_flags`' flags."""
    from jaxpost.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)


def _synthesize(argv: Sequence[str]) -> int:
    from jaxpost.compile_cache import compilation_cache

    compilation_cache()
    return synthesize_main(list(argv))  # a UserError reaches main(): one line on stderr, exit 2


def synthesize_main(argv: Sequence[str] | None = None) -> int:
    """``jaxpost synthesize``: the command line of :func:`jaxpost.recipes.synthetic.synthesize` (see ``--help``).

    Returns 0; a bad argument exits through argparse (status 2).
    """
    from jaxpost.generate.synthesis import MODES
    from jaxpost.recipes.synthetic import synthesize

    p = argparse.ArgumentParser(prog="jaxpost synthesize", description="Synthetic data: sample N completions per "
                                "prompt, score, filter, and write training sets.")
    p.add_argument("--model", required=True, help="policy: Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="JSON-lines file with a 'prompt' per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=_int_from(1), default=8, help="samples per prompt")
    p.add_argument("--mode", choices=MODES, default="best_of_n")
    p.add_argument("--reward", default=None, help="comma-separated registered reward names (jaxpost.generate.REWARDS)")
    p.add_argument("--reward_weights", default=None, help="comma-separated weights for --reward")
    p.add_argument("--reward_model", default=None, help="reward model directory (instead of --reward)")
    p.add_argument("--min_score", type=float, default=None)
    p.add_argument("--min_chars", type=int, default=1)
    p.add_argument("--max_chars", type=int, default=None)
    p.add_argument("--no_dedup", action="store_true")
    p.add_argument("--require_finished", action="store_true")
    _sampling_flags(p, max_new_tokens=64)
    p.add_argument("--batch_size", type=_int_from(1), default=8)
    p.add_argument("--max_prompt_len", type=_int_from(1), default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.reward is None) == (a.reward_model is None):
        p.error("give exactly one of --reward (names) and --reward_model (a directory)")
    _find_model_flags(a.model, a.tokenizer, a.reward_model)
    if a.reward is not None:
        from jaxpost.generate.rewards import make_reward
        weights = [float(w) for w in a.reward_weights.split(",")] if a.reward_weights else None
        scorer: Any = make_reward(a.reward.split(","), weights)
    else:
        scorer = a.reward_model
    synthesize(model_dir=a.model, tokenizer=a.tokenizer, prompts=a.prompts, out_dir=a.out, n_samples=a.n,
               sampling=_sampling_config(a),
               scorer=scorer, mode=a.mode, min_score=a.min_score, min_chars=a.min_chars, max_chars=a.max_chars,
               dedup=not a.no_dedup, require_finished=a.require_finished, batch_size=a.batch_size,
               max_prompt_len=a.max_prompt_len, seed=a.seed)
    return 0


def _demo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxpost demo", description="The whole post-training story on CPU, offline.")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--quick", action="store_true", help="a reduced size (used by the tests)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--feedback", action="store_true",
                   help="after a demo in --out: simulated users rate its SFT policy, continual rounds learn from it")
    p.add_argument("--tools", action="store_true",
                   help="the tool demo: SFT then multi-turn GRPO with a calculator tool, into --out/tools")
    args = p.parse_args(argv)
    if args.feedback and args.tools:
        p.error("--feedback and --tools are two separate demos: pass one of them")
    if args.tools and args.resume:
        p.error("--resume continues the main demo; the tool demo starts over: pass a new --out")
    from jaxpost.compile_cache import compilation_cache
    from jaxpost.demo import run_demo

    compilation_cache()  # a second demo, or one resumed with --resume, compiles nothing it compiled before
    if args.feedback:
        from jaxpost.demo.feedback import run_feedback_demo
        run_feedback_demo(args.out, **({"batches": 2, "per_batch": 64} if args.quick else {}))
        return 0
    try:
        if args.tools:
            from jaxpost.demo.tools import run_tools_demo
            run_tools_demo(args.out, quick=args.quick)
            return 0
        run_demo(args.out, quick=args.quick, resume=args.resume)
    except FileExistsError as e:
        print(f"jaxpost demo: {e}", file=sys.stderr)
        return 2
    return 0


def _plot(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxpost plot", description="Plot the metrics of one or more runs to PNG.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: loss and eval/*)")
    args = p.parse_args(argv)
    from jaxpost.plot import plot_runs
    out = plot_runs(args.run_dirs, args.out, args.metrics.split(",") if args.metrics else None)
    print(out)
    return 0


def _plan(argv: Sequence[str]) -> int:
    from jaxpost.plan import main as plan_main
    return plan_main(argv)


COMMANDS = {"train": _train, "generate": _generate, "synthesize": _synthesize, "demo": _demo, "plot": _plot, "plan": _plan}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``jaxpost`` command; returns its exit status.

    A user error (:class:`jaxpost.errors.UserError`, which includes
    :class:`jaxpost.config.ConfigError`, or a ``FileNotFoundError``) is
    printed as one paragraph, ``jaxpost: error: ...``, on stderr and gives
    2; its traceback only with ``--debug`` (anywhere on the command line) or
    ``JAXPOST_DEBUG=1``. A run halted by a non-finite loss
    (:class:`jaxpost.train.NonFiniteLossError`) is printed the same way and
    gives 1. A run stopped by a signal at a saved step
    (:class:`jaxpost.train.interrupt.RunInterrupted`) prints where it saved
    and gives 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM);
    a Ctrl-C anywhere else prints ``jaxpost: interrupted`` and gives 130.
    Any other exception is a bug and propagates.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("JAXPOST_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}  (`jaxpost COMMAND --help` for each; --debug shows tracebacks)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except (UserError, FileNotFoundError) as e:
        if debug:
            traceback.print_exc()
        print(user_error_paragraph(e), file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the run stopped itself, its message says what next
        if debug:
            traceback.print_exc()
        print(user_error_paragraph(e), file=sys.stderr)
        return 1
    except RunInterrupted as e:  # a signal stopped the run at a saved step
        if debug:
            traceback.print_exc()
        resume = ("run the same jaxpost demo command with --resume" if argv[0] == "demo"
                  else "run the same command again")
        print(f"jaxpost: {e.message(resume)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if debug:
            traceback.print_exc()
        print("jaxpost: interrupted", file=sys.stderr)
        return 130


def user_error_paragraph(e: BaseException) -> str:
    """``jaxpost: error: <message>`` on one line: gin's ``In call to configurable`` trail and carets dropped."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and set(ln) != {"^"} and not ln.startswith("In call to configurable")]
    msg = " ".join(" ".join(lines).split())
    if isinstance(e, FileNotFoundError):
        msg = re.sub(r"^\[Errno \d+\]\s*", "", msg)
        msg = f"{msg[:1].lower()}{msg[1:]}; check the path (relative paths start at {os.getcwd()})"
    return f"jaxpost: error: {msg}"


if __name__ == "__main__":
    sys.exit(main())
