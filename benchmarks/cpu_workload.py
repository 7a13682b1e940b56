"""Side-by-side benchmark: jaxpost vs TRL, Tunix (and the bare torch loop) on the shared workload.

    python benchmarks/cpu_workload.py [--task sft|dpo|all] [--steps 20] [--warmup 3] \\
        [--tunix-python /work/venvs/tunix/bin/python]

runs /work/shared/bench/WORKLOAD.md (SFT: 8 x 512 tokens, lr 1e-4; DPO: 4
pairs of 128 + 384 tokens, sigmoid beta 0.1, frozen reference run every
step, lr 1e-6; Llama 4 x 256, vocab 8192, fp32, AdamW, clip 1.0). Each
system runs in its own subprocess, pinned with ``taskset -c 0,1``, torch
threads = 2, one at a time; all start from the same seed-0 weights
(jaxpost's, exported with ``save_hf``) and train on the same token ids.
Tunix runs under the Python of its own virtualenv (``--tunix-python`` or
``$JAXPOST_TUNIX_PYTHON``; skipped when neither names one that has
``tunix``), see ``run_tunix.py``.

Printed per task and system: time to first step (jaxpost: trace + compile
+ run), median step seconds after the warm-up, tokens/s (SFT: B*L / step)
or pairs/s (DPO: B / step), peak RSS of the child, first-step loss (equal
losses show the systems do the same work) and the ratios jaxpost/other.
Results also go to ``benchmarks/results/<date>_<task>.{json,md}``.

At real sizes on an accelerator (MFU from ``ModelConfig.flops_per_token``
and the peak table in ``jaxpost/train/metrics.py``)::

    python benchmarks/cpu_workload.py --systems jaxpost --model configs/models/llama3_2_1b.gin \\
        --seq 2048 --batch 8 --dtype bfloat16 --cpus none
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import workload as W  # noqa: E402

SYSTEMS = ("jaxpost", "trl", "torch", "tunix")
THROUGHPUT_UNIT = {"sft": "tokens/s", "dpo": "pairs/s"}


def task_shape(task: str, batch: int | None, seq: int | None) -> W.Shape:
    """The WORKLOAD.md shape, with ``batch``/``seq`` overrides (DPO keeps its 1:3 prompt:completion split)."""
    base = W.SFT_SHAPE if task == "sft" else W.DPO_SHAPE
    b, s = batch or base.batch, seq or base.seq
    prompt = 0 if task == "sft" else (base.prompt if s == base.seq else s // 4)
    return W.Shape(batch=b, seq=s, prompt=prompt)


def throughput(task: str, shape: W.Shape, step_s: float) -> float:
    """SFT: processed tokens per second ``B * L / step_s``; DPO: pairs per second ``B / step_s``."""
    return (shape.batch * shape.seq if task == "sft" else shape.batch) / step_s


TUNIX_ENV = "JAXPOST_TUNIX_PYTHON"


def tunix_unavailable(python: str | None, dtype: str = "float32") -> str | None:
    """Why Tunix cannot run with interpreter ``python`` (None: it can).

    Tunix lives in its own virtualenv (its pins would downgrade transformers
    here), so it needs that venv's Python; ``find_spec`` checks the package
    without importing it.
    """
    if not python:
        return f"no Tunix interpreter: pass --tunix-python PATH or set ${TUNIX_ENV} (see benchmarks/README.md)"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"Tunix interpreter {python} does not exist or is not executable"
    has_tunix = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tunix') is None)"
    probe = subprocess.run([python, "-c", has_tunix], capture_output=True)
    if probe.returncode != 0:
        return f"{python} has no tunix package (pip install google-tunix into that venv)"
    if dtype != "float32":
        return f"Tunix's Llama 3 has no mixed-precision mode; only float32 is compared (got --dtype {dtype})"
    return None


def available_systems(tunix_python: str | None = None, dtype: str = "float32") -> dict[str, str | None]:
    """``{system: None if runnable else the reason it is not}``."""
    import importlib.util

    out = {"jaxpost": None}
    has_torch = importlib.util.find_spec("torch") is not None
    out["torch"] = None if has_torch else "torch is not installed"
    out["trl"] = None if (has_torch and importlib.util.find_spec("trl") is not None) else "trl is not installed"
    out["tunix"] = tunix_unavailable(tunix_python, dtype)
    return out


# ---------------------------------------------------------------- child process


def child_main(a) -> None:
    """Run one system on one task and write its result JSON (with peak RSS) to ``a.result``."""
    shape = task_shape(a.task, a.batch, a.seq)
    if a.child == "jaxpost":
        import run_jaxpost
        res = run_jaxpost.run(a.task, a.model, shape, a.steps, a.warmup, a.dtype, a.chunk, a.remat,
                              attention=a.attention, dpo_layout=a.dpo_layout, steps_per_call=a.steps_per_call)
    elif a.child == "tunix":  # under the Tunix venv's Python
        import run_tunix
        res = run_tunix.run(a.task, a.weights, shape, a.steps, a.warmup, a.dtype)
    else:
        import run_torch
        fn = run_torch.run_trl if a.child == "trl" else run_torch.run_torch
        res = fn(a.task, a.weights, shape, a.steps, a.warmup, a.dtype, a.threads)
    # ru_maxrss is in KiB on Linux.
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    with open(a.result, "w") as f:
        json.dump(res, f)


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    # One CPU device in the child: the fake multi-device flag of the test suite would split the work.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")]))
    return env


def spawn(system: str, a, result_path: str, weights: str | None) -> dict:
    """Run ``system`` in a fresh (pinned) process; returns its result dict."""
    python = a.tunix_python if system == "tunix" else sys.executable
    cmd = [python, os.path.abspath(__file__), "--child", system, "--result", result_path,
           "--task", a.task_now, "--steps", str(a.steps), "--warmup", str(a.warmup), "--model", a.model,
           "--dtype", a.dtype, "--chunk", str(a.chunk), "--remat", a.remat, "--attention", a.attention,
           "--dpo-layout", a.dpo_layout, "--threads", str(a.threads), "--steps-per-call", str(a.steps_per_call)]
    if a.batch:
        cmd += ["--batch", str(a.batch)]
    if a.seq:
        cmd += ["--seq", str(a.seq)]
    if weights:
        cmd += ["--weights", weights]
    if a.cpus != "none" and shutil.which("taskset"):
        cmd = ["taskset", "-c", a.cpus] + cmd
    proc = subprocess.run(cmd, env=_child_env(a.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} ({a.task_now}) failed with exit code {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(result_path) as f:
        return json.load(f)


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    """Platform string, CPU count, CPU model and load average at the time of the call."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "nproc": os.cpu_count(),
            "cpu_model": model, "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def summarize(task: str, shape: W.Shape, results: dict[str, dict]) -> dict:
    """Adds ``throughput`` and ``mfu`` per system and ``ratios`` (jaxpost over each other system).

    ``speedup = jaxpost throughput / other throughput`` (> 1: jaxpost
    faster); ``rss_ratio = jaxpost peak RSS / other peak RSS`` (< 1: jaxpost
    smaller); ``first_step_ratio`` likewise for time to first step.
    """
    from jaxpost.train.metrics import mfu

    flops = results.get("jaxpost", {}).get("flops_per_step")
    for r in results.values():
        r["throughput"] = throughput(task, shape, r["median_step_s"])
        r["mfu"] = mfu(flops, r["median_step_s"], r.get("n_devices", 1), r.get("device_kind", "cpu")) if flops else None
    ratios = {}
    if "jaxpost" in results:
        j = results["jaxpost"]
        for name, r in results.items():
            if name != "jaxpost":
                ratios[name] = {"speedup": j["throughput"] / r["throughput"],
                                "rss_ratio": j["peak_rss_mib"] / r["peak_rss_mib"],
                                "first_step_ratio": j["first_step_s"] / r["first_step_s"]}
    return {"task": task, "shape": dataclasses.asdict(shape),
            "unit": THROUGHPUT_UNIT[task], "systems": results, "ratios": ratios}


def markdown(summary: dict, machine: dict, args: dict) -> str:
    """One markdown table per task plus ratio lines and the machine/config footer."""
    lines = []
    for s in summary["tasks"]:
        unit = s["unit"]
        sh = s["shape"]
        lines += [f"### {s['task'].upper()} (batch {sh['batch']} x {sh['seq']} tokens"
                  + (f", prompt {sh['prompt']}" if s["task"] == "dpo" else "") + ")", "",
                  f"| system | first step (s) | median step (s) | {unit} | peak RSS (MiB) | first loss | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in s["systems"].items():
            m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {r['first_step_s']:.2f} | {r['median_step_s']:.3f} | {r['throughput']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['losses'][0]:.4f} | {m} |")
        lines.append("")
        for name, q in s["ratios"].items():
            lines.append(f"- jaxpost vs {name}: {q['speedup']:.2f}x {unit}, peak RSS x{q['rss_ratio']:.2f}, "
                         f"time to first step x{q['first_step_ratio']:.2f}")
        lines.append("")
    for name, why in summary.get("skipped", {}).items():
        lines.append(f"- {name}: not run: {why}")
    lines += ["", f"Machine: {machine['cpu_model']}, nproc {machine['nproc']}, {machine['platform']}, "
              f"load average before/after {machine['loadavg_start']} / {machine['loadavg_end']}.",
              f"Settings: {json.dumps(args, sort_keys=True)}", ""]
    return "\n".join(lines)


def print_table(s: dict) -> None:
    unit = s["unit"]
    print(f"\n== {s['task'].upper()} {s['shape']} ==")
    print(f"{'system':8s} {'first(s)':>9s} {'median(s)':>10s} {unit:>11s} {'RSS MiB':>8s} {'loss0':>8s} {'MFU':>6s}")
    for name, r in s["systems"].items():
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        print(f"{name:8s} {r['first_step_s']:9.2f} {r['median_step_s']:10.4f} {r['throughput']:11.1f} "
              f"{r['peak_rss_mib']:8.0f} {r['losses'][0]:8.4f} {m:>6s}")
    for name, q in s["ratios"].items():
        print(f"jaxpost/{name}: {q['speedup']:.2f}x {unit}, RSS x{q['rss_ratio']:.2f}, "
              f"first step x{q['first_step_ratio']:.2f}")


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("sft", "dpo", "all"), default="all")
    ap.add_argument("--steps", type=int, default=20, help="measured steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--systems", default="jaxpost,trl,torch,tunix",
                    help=f"comma-separated among {SYSTEMS}; ones that are not installed are skipped")
    ap.add_argument("--tunix-python", default=os.environ.get(TUNIX_ENV),
                    help=f"Python of the virtualenv with google-tunix (default: ${TUNIX_ENV}); unset: Tunix is skipped")
    ap.add_argument("--model", default=os.path.join(ROOT, "configs/models/bench.gin"), help="gin model preset")
    ap.add_argument("--batch", type=int, default=None, help="override the workload batch (sequences / pairs)")
    ap.add_argument("--seq", type=int, default=None, help="override the sequence length")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype (bfloat16: fp32 master weights, bf16 forward/backward)")
    ap.add_argument("--chunk", type=int, default=512, help="jaxpost token_logprobs chunk size")
    ap.add_argument("--remat", choices=("none", "full", "save_dots"), default="none", help="jaxpost remat policy")
    ap.add_argument("--dpo-layout", choices=("shared", "unpacked"), default="shared",
                    help="jaxpost DPO batch layout: the prompt run once for both completions, or one row per "
                         "sequence (what TRL, Tunix and the torch loop run)")
    ap.add_argument("--attention", choices=("xla", "cudnn", "auto"), default="auto",
                    help="jaxpost attention kernel (cudnn: fused flash attention on NVIDIA GPUs, bf16)")
    ap.add_argument("--steps-per-call", type=int, default=1,
                    help="jaxpost optimizer steps per compiled call (LoopConfig.steps_per_call, a lax.scan)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    ap.add_argument("--cpus", default="0,1", help="taskset CPU list for every child, or 'none'")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder ('' = do not write)")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1:
        ap.error(f"--steps and --warmup must be >= 1 (the first step is the compile step), got {a.steps}, {a.warmup}")
    if not os.path.exists(a.model):
        ap.error(f"--model {a.model}: no such gin file")
    if a.child:
        a.task_now = a.task
        child_main(a)
        return None

    wanted = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SYSTEMS]
    if bad:
        ap.error(f"--systems: unknown {bad}; choose among {SYSTEMS}")
    avail = available_systems(a.tunix_python, a.dtype)
    skipped = {s: avail[s] for s in wanted if avail[s] is not None}
    for s in ("trl", "tunix"):
        if s not in wanted and avail.get(s):
            skipped.setdefault(s, avail[s])
    run_systems = [s for s in wanted if avail[s] is None]
    for name, why in skipped.items():
        print(f"[skip] {name}: {why}", flush=True)
    machine = machine_info()
    machine["loadavg_start"] = machine.pop("loadavg")
    tasks = ("sft", "dpo") if a.task == "all" else (a.task,)
    work = tempfile.mkdtemp(prefix="jaxpost_bench_")
    weights = None
    summaries = []
    try:
        if any(s in ("trl", "torch", "tunix") for s in run_systems):
            weights = os.path.join(work, "model")
            proc = subprocess.run([sys.executable, "-c", "import sys; import run_torch; "
                                   "run_torch.export_weights(sys.argv[1], sys.argv[2])", a.model, weights],
                                  env=_child_env(a.threads), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"weight export failed:\n{proc.stderr[-4000:]}")
        for task in tasks:
            a.task_now = task
            results = {}
            for system in run_systems:
                print(f"[run] {task} / {system} ...", flush=True)
                results[system] = spawn(system, a, os.path.join(work, f"{task}_{system}.json"), weights)
            s = summarize(task, task_shape(task, a.batch, a.seq), results)
            print_table(s)
            summaries.append(s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    settings = {k: v for k, v in vars(a).items() if k not in ("child", "result", "weights", "task_now", "out")}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
              "settings": settings, "tasks": summaries, "skipped": skipped}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"_{a.task}_{a.dtype}")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"## jaxpost side-by-side benchmark ({report['date']})\n\n" + markdown(report, machine, settings))
        print(f"\nwrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
