"""``jaxpost`` command line: train | generate | synthesize | demo | plot.

    jaxpost train --gin_file=configs/experiments/demo/sft.gin --gin.LoopConfig.num_steps=50
    jaxpost generate --model runs/demo/sft/final --prompts prompts.jsonl --out samples.jsonl --n 4
    jaxpost synthesize --model runs/demo/sft/final --prompts prompts.jsonl --out data/ --n 8 --mode all --reward exact_match
    jaxpost demo [--out runs/demo] [--quick] [--resume]
    jaxpost plot runs/demo/sft [runs/demo/dpo ...] [--out curves.png]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import gin


@gin.configurable
def run(task=gin.REQUIRED):
    """The entry a ``train`` gin file binds: ``run.task = @sft`` (or @dpo, @reward_model...)."""
    return task()


def _train(argv: Sequence[str]) -> int:
    from jaxpost import config, distributed
    from jaxpost.compile_cache import compilation_cache

    files, bindings, rest = config.split_gin_args(argv)
    if rest:
        raise SystemExit(f"jaxpost train: unexpected arguments {rest}; use --gin_file=F and --gin.KEY=VALUE")
    if not files:
        raise SystemExit("jaxpost train needs at least one --gin_file")
    distributed.initialize()
    try:
        config.parse(files, bindings)
    except config.ConfigError as e:
        print(f"jaxpost: {e}", file=sys.stderr)
        return 2
    compilation_cache()  # as bound in the gin files (compilation_cache.cache_dir = None turns it off)
    summary = run()
    if summary and distributed.is_main_process():
        print({k: v for k, v in summary.items()})
    return 0


def _generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxpost generate",
                                description="Sample completions for a prompt file (jsonl with 'prompt') to jsonl.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. RUN_DIR/final)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="jsonl with a 'prompt' field (text or messages)")
    p.add_argument("--out", required=True, help="output jsonl: prompt, completion, sample_index + input fields")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from jaxpost import distributed
    from jaxpost.compile_cache import compilation_cache
    from jaxpost.generate import SamplingConfig, generate_to_jsonl

    distributed.initialize()
    compilation_cache()
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
    n = generate_to_jsonl(args.model, args.tokenizer or args.model, args.prompts, args.out, sampling,
                          n_samples_per_prompt=args.n, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {n} completions to {args.out}")
    return 0


def _synthesize(argv: Sequence[str]) -> int:
    from jaxpost.compile_cache import compilation_cache
    from jaxpost.pipelines.synthetic import synthesize_main

    compilation_cache()
    return synthesize_main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxpost demo", description="The whole post-training story on CPU, offline.")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--quick", action="store_true", help="a reduced size (used by the tests)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    args = p.parse_args(argv)
    from jaxpost.compile_cache import compilation_cache
    from jaxpost.demo import run_demo

    compilation_cache()  # a second demo, or one resumed with --resume, compiles nothing it compiled before
    try:
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


COMMANDS = {"train": _train, "generate": _generate, "synthesize": _synthesize, "demo": _demo, "plot": _plot}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
