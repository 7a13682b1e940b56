"""``jaxpost plan``: will this run fit, and how fast can it go? Answered before paying for the pod.

    jaxpost plan --gin_file=configs/runs/sft.gin --gin_file=configs/models/llama3_2_1b.gin \\
        --devices 8 --device_kind h100

Compiles the run's real train step (and, for online methods, its sampler)
for ``--devices`` simulated devices on the mesh its gin files give, without
allocating parameters, and prints per-device memory (parameters, optimizer
state, gradients, frozen models, KV cache, XLA temporaries, peak), whether
that fits ``--device_kind``'s memory, the step's FLOPs and its time at the
chip's bf16 peak. A run that does not fit gets suggestions, each measured by
planning again with that one change. See ``docs/plan.md``.

The process needs ``--devices`` devices and :data:`PLAN_XLA_FLAGS` before
JAX starts: when it lacks either it re-runs itself in a subprocess with
``XLA_FLAGS`` from :func:`plan_xla_flags` (the caller's flags, the device
count ``N`` and the planning flags) and ``JAX_PLATFORMS=cpu``. Temporaries
and peak are therefore XLA's CPU compile of the same program, an estimate
of the TPU/GPU compile (``docs/plan.md``, "FSDP temporaries", says where it
overstates); parameter, optimizer, gradient, frozen-model and cache bytes
are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

from jaxpost.errors import UserError
from jaxpost.plan.devices import DEVICE_KINDS, DeviceKind, device_kind

__all__ = ["DEVICE_KINDS", "PLAN_XLA_FLAGS", "DeviceKind", "device_kind", "main", "plan_xla_flags"]

_CHILD_ENV = "JAXPOST_PLAN_CHILD"
_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Two XLA:CPU compile choices would put every layer's FSDP weights among the step's temporaries, where the TPU
# and GPU compiles keep about one layer's (docs/plan.md, "FSDP temporaries", has the measurements):
# * the default CPU schedule is built for concurrency: it issues every all-gather of the step up front, so all
#   layers' gathered weights are live at once (the TPU/GPU schedulers bound the collectives in flight);
# * XLA:CPU has no reduce-scatter: a gradient is all-reduced whole and then sliced, and its all-reduce combiner
#   joins the layers' all-reduces into one chain that ends after the whole backward pass, which keeps every
#   layer's whole float32 weight gradient live until then.
# The plan compiles with the memory-minimizing CPU schedule and without that combiner.
PLAN_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
                  "--xla_disable_hlo_passes=cpu-all-reduce-combiner")
_DISABLE = "--xla_disable_hlo_passes="

EPILOG = """\
gin arguments as for `jaxpost train` (--gin_file=FILE, --gin.KEY=VALUE; required paths such as run_dir,
train_data and init_from may stay unset: shapes come from the config; init_from, when it names an HF
directory, is read for its config.json only).

examples:
  jaxpost plan --gin_file=configs/runs/sft.gin --gin_file=configs/models/llama3_2_1b.gin --devices 8 --device_kind h100
  jaxpost plan --gin_file=configs/runs/grpo.gin --gin_file=configs/models/llama3_1_8b.gin \\
      --gin_file=configs/mesh/fsdp_tp.gin --devices 64 --device_kind v5p
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxpost plan", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile a run's step for N simulated devices (no parameters allocated) and print per-device "
                    "memory, whether it fits, FLOPs and step time, and what would make it fit.")
    p.add_argument("--gin_file", metavar="FILE", action="append", help="a gin file, as for jaxpost train; repeatable")
    p.add_argument("--devices", type=int, required=True, help="number of devices (chips) of the run")
    p.add_argument("--device_kind", default="h100",
                   help=f"one of {', '.join(DEVICE_KINDS)} (memory and bf16 peak per chip; default h100)")
    p.add_argument("--device_memory_gb", type=float, default=None,
                   help="override the kind's memory per device (GiB), e.g. to plan for a smaller share")
    p.add_argument("--no_suggestions", action="store_true", help="do not re-plan to find settings that fit")
    p.add_argument("--json", dest="json_out", metavar="FILE", default=None, help="also write the plan as JSON")
    p.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                   help="import MODULE before reading the gin files; repeatable")
    return p


def main(argv: Sequence[str]) -> int:
    """``jaxpost plan``: returns 0 when the run fits, 1 when it does not; a user error raises :class:`UserError`."""
    from jaxpost import config

    argv = list(argv)
    files, bindings, rest = config.split_gin_args(argv)
    p = _parser()
    args = p.parse_args(rest)
    if not files:
        p.error("at least one --gin_file is needed (e.g. --gin_file=configs/runs/sft.gin)")
    if args.devices < 1:
        p.error(f"--devices must be >= 1, got {args.devices}")
    kind = device_kind(args.device_kind, args.device_memory_gb)
    config.import_modules(args.imports)
    config.parse(files, bindings, finalize=False)  # a wrong key fails here, before any subprocess or compile
    config.check_bound_values()  # so does a value out of range (ppo.lam = 1.5), as in `jaxpost train`
    from jaxpost.plan.core import bound_task
    bound_task()
    if not _process_has(args.devices):
        return _reexec(argv, args.devices)
    return _run(files, bindings, args, kind)


def _process_has(n: int) -> bool:
    """True when this process runs on ``n`` CPU devices (JAX started, or about to start, with them) and with
    :data:`PLAN_XLA_FLAGS`."""
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(_COUNT_FLAG + r"=(\d+)", flags)
    if not m or int(m.group(1)) != n or plan_xla_flags(n, flags).split() != flags.split():
        return False
    import jax
    return jax.default_backend() == "cpu" and jax.device_count() == n


def _reexec(argv: list[str], n: int) -> int:
    if os.environ.get(_CHILD_ENV):
        raise RuntimeError(f"jaxpost plan: the subprocess still does not have {n} CPU devices")
    env = {**os.environ, "XLA_FLAGS": plan_xla_flags(n), "JAX_PLATFORMS": "cpu", _CHILD_ENV: "1"}
    return subprocess.run([sys.executable, "-m", "jaxpost.plan", *argv], env=env).returncode


def plan_xla_flags(n: int, flags: str | None = None) -> str:
    """``XLA_FLAGS`` for a planning process of ``n`` CPU devices: ``flags`` (default: this process's) with the
    device count set to ``n`` and :data:`PLAN_XLA_FLAGS` added."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    disabled: list[str] = []
    kept = []
    for f in [*flags.split(), *PLAN_XLA_FLAGS]:
        if f.startswith(_DISABLE):  # one list of disabled passes: the user's and the plan's
            disabled += [p for p in f[len(_DISABLE):].split(",") if p and p not in disabled]
        elif not f.startswith(_COUNT_FLAG + "=") and f not in kept:
            kept.append(f)
    return " ".join([*kept, f"{_COUNT_FLAG}={n}"] + ([_DISABLE + ",".join(disabled)] if disabled else []))


def _run(files, bindings, args, kind: DeviceKind) -> int:
    from jaxpost import config
    from jaxpost.plan.core import plan_current

    base = plan_current(args.devices)
    print(format_plan(base, kind), flush=True)
    suggestions = []
    if not base.fits(kind) and not args.no_suggestions:
        print("\nIt does not fit. Measuring each setting by planning again with it:", flush=True)
        for label, extra in base.settings["options"]:
            config.parse(files, [*bindings, *extra], finalize=False)
            try:
                other = plan_current(args.devices)
            except (UserError, ValueError) as e:
                print(f"  {label}: cannot plan ({str(e).splitlines()[0][:160]})", flush=True)
                continue
            saved = base.peak - other.peak
            suggestions.append({"setting": label, "bindings": extra, "peak": other.peak, "saves": saved,
                                "fits": other.fits(kind)})
            print(f"  {label:<52} peak {gib(other.peak):>11}  saves {gib(saved):>11}"
                  f"{'  -> fits' if other.fits(kind) else ''}", flush=True)
        config.parse(files, bindings, finalize=False)
        good = [s for s in suggestions if s["saves"] > 0]
        if good:
            best = max(good, key=lambda s: s["saves"])
            print(f"\nLargest single saving: {best['setting']} "
                  f"({' '.join(_shell_flag(b) for b in best['bindings'])}). "
                  f"Settings combine; plan again with several.")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**plan_dict(base, kind), "suggestions": suggestions}, f, indent=1)
    return 0 if base.fits(kind) else 1


def _shell_flag(binding: str) -> str:
    """``KEY = VALUE`` as a flag to paste into a shell: ``--gin.KEY=VALUE``, quoted where the shell needs it."""
    flag = "--gin." + binding.replace(" ", "")
    if re.fullmatch(r"[\w.=@,/+-]+", flag):
        return flag
    return f'"{flag}"' if not re.search(r'["$`\\]', flag) else shlex.quote(flag)


def gib(n: float) -> str:
    from jaxpost.plan.core import gib as _g
    return _g(n)


def plan_dict(plan, kind: DeviceKind) -> dict:
    import dataclasses
    out = {k: v for k, v in dataclasses.asdict(plan).items() if k != "settings"}
    out.update(device_kind=kind.name, device_memory=kind.memory_bytes, fits=plan.fits(kind),
               step_seconds=plan.step_seconds(kind))
    return out


def format_plan(plan, kind: DeviceKind) -> str:
    """The plan as the console shows it."""
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows = [("parameters", plan.params, "exact: shapes x shardings"),
            ("optimizer state", plan.optimizer, "exact"),
            ("gradients", plan.gradients, "exact; live inside the step (part of XLA temporaries)")]
    for name, b in plan.frozen.items():
        rows.append((f"frozen model: {name}", b, "exact"))
    if plan.rollout_peak:
        rows.append(("KV cache (rollouts)", plan.kv_cache, "exact, at its largest (prompt + new tokens)"))
    rows += [("step arguments (state, batch, frozen)", plan.step_arguments, "XLA"),
             ("XLA temporaries (train step)", plan.step_temp, f"estimate: XLA {plan.backend.upper()} compile"),
             ("peak (train step)", plan.step_peak, "arguments + outputs - donated + temporaries"
              + (" + frozen models held beside it" if plan.resident else ""))]
    if plan.rollout_peak:
        rows.append(("peak (rollout: sampler program)", plan.rollout_peak,
                     "sampler (policy, cache, temporaries) + optimizer state + frozen models"))
    rows.append(("peak", plan.peak, ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"jaxpost plan: {plan.method}, model {plan.model}",
             f"  batch: {plan.shape_note}",
             f"  mesh: {mesh} ({plan.rules} rules) on {plan.devices} x {kind.label}",
             "per device:"]
    lines += [f"  {name:<{width}}  {gib(b):>11}  {note}" for name, b, note in rows]
    pct = 100 * plan.peak / kind.memory_bytes
    verdict = "fits" if plan.fits(kind) else "does NOT fit"
    lines.append(f"  => {verdict} in {gib(kind.memory_bytes)} per device ({pct:.0f}% used)")
    if kind.gpu:
        lines.append("     (GPU: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 of it by default; set 0.95)")
    secs = plan.step_seconds(kind)
    lines.append(f"compute per device per step: {plan.xla_flops:.3g} FLOPs (XLA), {plan.model_flops:.3g} FLOPs "
                 f"(6N + attention model); at {kind.peak_flops / 1e12:.0f} TFLOP/s bf16 peak: "
                 f"{secs * 1e3:.3g} ms per step (a lower bound; 40-60% MFU is typical)")
    if plan.rollout_peak:
        lines.append("  (train step only: sampling is bound by memory bandwidth, not FLOPs)")
    lines.append(f"Temporaries and peak come from XLA's {plan.backend.upper()} compile of the same program "
                 f"(an estimate for TPU/GPU); compiled in {plan.compile_s:.1f}s.")
    return "\n".join(lines)
