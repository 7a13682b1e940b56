"""Sweep jaxpost step settings on one accelerator; prints MFU and speed relative to the first variant.

    python benchmarks/mfu_sweep.py --model configs/models/llama3_2_1b.gin --task sft --seq 2048 \\
        --variant batch=8,attention=cudnn --variant batch=8,attention=cudnn,chunk=2048 \\
        --variant batch=16,attention=cudnn,remat=save_dots

Each ``--variant`` is ``key=value`` pairs among ``batch``, ``chunk``,
``remat``, ``attention``, ``dtype`` (default bfloat16) and
``stored_logits_mib`` (keep the LM head's logits for autodiff up to this
size instead of recomputing them). All variants run in
this one process, one after the other, through the same path as
``cpu_workload.py`` (``run_jaxpost.run``: public loss, optimizer and compiled
sharded step); a variant that runs out of memory is reported as such and the
sweep goes on. The first variant is the baseline of the ``speed`` column
(throughput ratio).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import run_jaxpost  # noqa: E402
import workload as W  # noqa: E402

KEYS = {"batch": int, "chunk": int, "remat": str, "attention": str, "dtype": str, "stored_logits_mib": int}


def parse_variant(text: str) -> dict:
    """``"batch=8,chunk=512"`` -> ``{"batch": 8, "chunk": 512}``; unknown keys are named."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--variant {text!r}: unknown key {key!r}; choose among {sorted(KEYS)}")
        out[key] = KEYS[key](value)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--out", default="", help="JSON file for the results ('' = do not write)")
    a = ap.parse_args(argv)
    rows = []
    for text in a.variant:
        v = {"batch": 8, "chunk": 512, "remat": "none", "attention": "cudnn", "dtype": "bfloat16",
             **parse_variant(text)}
        shape = W.Shape(batch=v["batch"], seq=a.seq, prompt=0 if a.task == "sft" else a.seq // 4)
        try:
            overrides = {"stored_logits_mib": v["stored_logits_mib"]} if "stored_logits_mib" in v else {}
            r = run_jaxpost.run(a.task, a.model, shape, a.steps, a.warmup, v["dtype"], v["chunk"], v["remat"],
                                attention=v["attention"], model_overrides=overrides)
        except Exception as e:  # noqa: BLE001 — an OOM variant is a result, not the end of the sweep
            rows.append({**v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"{text}: {rows[-1]['error']}", flush=True)
            continue
        finally:
            gc.collect()
        from jaxpost.train.metrics import mfu

        units = shape.batch * shape.seq if a.task == "sft" else shape.batch
        row = {**v, "first_step_s": r["first_step_s"], "median_step_s": r["median_step_s"],
               "throughput": units / r["median_step_s"], "device_kind": r["device_kind"],
               "mfu": mfu(r["flops_per_step"], r["median_step_s"], r["n_devices"], r["device_kind"])}
        rows.append(row)
        base = next(x for x in rows if "error" not in x)
        m = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"{text}: first {row['first_step_s']:.1f}s, median {row['median_step_s']:.4f}s, "
              f"{row['throughput']:.1f} {'tokens' if a.task == 'sft' else 'pairs'}/s, MFU {m}, "
              f"speed x{row['throughput'] / base['throughput']:.3f} vs first", flush=True)
        if a.out:  # after every variant, so a sweep cut short by a time limit keeps what it measured
            with open(a.out, "w") as f:
                json.dump({"task": a.task, "model": a.model, "seq": a.seq, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
