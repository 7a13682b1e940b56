"""Where a compiled train step's accelerator time goes: kernel time by kind, from a ``jax.profiler`` trace.

    python benchmarks/gpu_profile.py --model configs/models/llama3_2_1b.gin --task sft --batch 8 --seq 2048

Runs ``run_jaxpost.run`` (the benchmark's own step), traces its last 3
steps, then sums the device planes' kernel durations per step: matmuls
(cuBLAS/CUTLASS/Triton GEMMs), attention (cuDNN fused attention), XLA
fusions (elementwise, reductions, copies), memory copies and the rest.
Prints each kind's share of kernel time, the device's busy fraction of the
wall time, and the largest kernels.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import run_jaxpost  # noqa: E402
import workload as W  # noqa: E402

KINDS = (  # first match wins
    ("attention", re.compile(r"fmha|flash|cudnn|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|triton_dot", re.I)),
    ("memcpy", re.compile(r"memcpy|memset", re.I)),
    ("xla fusion", re.compile(r"fusion|loop_|input_|reduce|convert|transpose|copy|broadcast|select", re.I)),
)


def kind(name: str) -> str:
    return next((k for k, pat in KINDS if pat.search(name)), "other")


def device_kernels(trace_dir: str):
    """``[(name, start_ns, duration_ns)]`` of every event on the accelerator planes of the newest trace."""
    from jax._src.lib import _profile_data  # the profiler's own reader of .xplane.pb files

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    out, seen = [], []
    for plane in _profile_data.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            seen.append(f"{plane.name}/{line.name}")
            if not re.search(r"stream", line.name, re.I):  # kernel lines; skip XLA op / module summaries
                continue
            out += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
    if not out:
        print("no kernel lines; device lines in the trace:", seen)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--stored-logits-mib", type=int, default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    shape = W.Shape(batch=a.batch, seq=a.seq, prompt=0 if a.task == "sft" else a.seq // 4)
    overrides = {} if a.stored_logits_mib is None else {"stored_logits_mib": a.stored_logits_mib}
    trace_dir = tempfile.mkdtemp(prefix="jaxpost_profile_")
    r = run_jaxpost.run(a.task, a.model, shape, a.steps, 2, "bfloat16", attention=a.attention,
                        model_overrides=overrides, profile_dir=trace_dir)
    kernels = device_kernels(trace_dir)
    if not kernels:
        raise SystemExit(f"no device kernels in the trace under {trace_dir}")
    span = max(s + d for _, s, d in kernels) - min(s for _, s, d in kernels)
    total = sum(d for *_, d in kernels)
    by_kind, by_name = collections.Counter(), collections.Counter()
    for name, _, d in kernels:
        by_kind[kind(name)] += d
        by_name[name[:110]] += d
    print(f"median step {r['median_step_s']:.4f} s; traced 3 steps: kernel time {total / 3e6:.1f} ms/step, "
          f"device span {span / 3e6:.1f} ms/step (busy {100 * total / span:.1f}%, streams may overlap)")
    for k, d in by_kind.most_common():
        print(f"  {k:12s} {d / 3e6:8.1f} ms/step  {100 * d / total:5.1f}%")
    print(f"largest {a.top} kernels (ms/step):")
    for name, d in by_name.most_common(a.top):
        print(f"  {d / 3e6:8.2f}  {100 * d / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
