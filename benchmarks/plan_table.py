"""The table of docs/plan.md: `jaxpost plan` for Llama 3.2 1B/3B, 3.1 8B/70B x SFT/DPO/GRPO x 8/64/256 devices.

    python benchmarks/plan_table.py [--out docs/plan.md] [--timeout 600] [--only 1b,3b] [--devices 8,64]
        [--remat full]

Each cell is one `jaxpost plan` command (a subprocess with N simulated CPU
devices) with the shipped gin files: configs/runs/<method>.gin, the model
preset, and a mesh preset (8 and 64 devices: configs/mesh/fsdp.gin; 256:
configs/mesh/fsdp_tp.gin, tensor=2), and `ModelConfig.remat` = --remat
(default 'full': without rematerialisation an FSDP step with unrolled layers
can keep every layer's gathered weights for the backward pass; docs/plan.md,
"FSDP temporaries"). The global batch is one row (SFT),
one pair (DPO) or one rollout row (GRPO) per batch shard, the runs'
default lengths otherwise (SFT/DPO 512 tokens; GRPO 16+ prompts x 8
samples, 256 prompt + 256 new tokens). Results accumulate in
benchmarks/plan_table.json (a cell already there is not recomputed; delete
it to redo), and the markdown table between the markers of --out is
rewritten from it after every cell. A cell whose compile exceeds --timeout
is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "plan_table.json"
MODELS = {"1b": ("Llama 3.2 1B", "configs/models/llama3_2_1b.gin"),
          "3b": ("Llama 3.2 3B", "configs/models/llama3_2_3b.gin"),
          "8b": ("Llama 3.1 8B", "configs/models/llama3_1_8b.gin"),
          "70b": ("Llama 3.1 70B", "configs/models/llama3_1_70b.gin")}
METHODS = ("sft", "dpo", "grpo")
DEVICES = (8, 64, 256)
BEGIN, END = "<!-- plan_table: begin -->", "<!-- plan_table: end -->"
GiB = 2 ** 30


def command(model: str, method: str, n: int, remat: str = "full") -> list[str]:
    mesh, shards = ("configs/mesh/fsdp.gin", n) if n < 256 else ("configs/mesh/fsdp_tp.gin", n // 2)
    args = [f"--gin_file=configs/runs/{method}.gin", f"--gin_file={MODELS[model][1]}", f"--gin_file={mesh}",
            f"--gin.ModelConfig.remat='{remat}'"]
    if method in ("sft", "dpo"):
        args.append(f"--gin.{method}.batch_size={shards}")
    else:
        prompts = max(16, shards // 8)
        args.append(f"--gin.OnlineConfig.prompts_per_rollout={prompts}")
    return ["plan", *args, "--devices", str(n), "--device_kind", "h100", "--no_suggestions"]


def run_cell(model: str, method: str, n: int, timeout: float, remat: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "jaxpost", *command(model, method, n, remat), "--json", out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return {"status": "error", "error": tail[0][:300], "wall_s": wall}
        return {"status": "ok", "wall_s": wall, "remat": remat, "date": time.strftime("%Y-%m-%d"),
                **json.load(open(out))}


def _g(n: float) -> str:
    return f"{n / GiB:.1f}"


def markdown(results: dict) -> str:
    lines = ["| model | method | devices | layers | mesh | batch | params + opt. state | frozen | KV cache | XLA temp. "
             "(train step) | peak | H100 80 GiB | v5p 95 GiB | v5e 16 GiB | step at H100 peak | wall (compile) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for method in METHODS:
            for n in DEVICES:
                r = results.get(f"{model}/{method}/{n}")
                name = f"{MODELS[model][0]} | {method.upper()} | {n}"
                if r is None:
                    lines.append(f"| {name} | | not run |" + " |" * 11)
                    continue
                if r["status"] != "ok":
                    why = "compile > timeout" if r["status"] == "timeout" else r.get("error", "error")
                    lines.append(f"| {name} | | {why} |" + " |" * 10 + f" {r['wall_s']:.0f} s |")
                    continue
                mesh = "x".join(str(v) for v in r["mesh"].values()) + f" {r['rules']}"
                layout = re.search(r"\((\d+)( scanned| unrolled)? layers", r["model"])
                layers = f"{layout.group(1)}{layout.group(2) or ''}" if layout else "?"
                fit = lambda mem: "yes" if r["peak"] <= mem * GiB else "**no**"
                lines.append(
                    f"| {name} | {layers} | {mesh} | {r['shape_note'].split(';')[0]} | {_g(r['params'] + r['optimizer'])} | "
                    f"{_g(sum(r['frozen'].values()))} | {_g(r['kv_cache'])} | {_g(r['step_temp'])} | "
                    f"{_g(r['peak'])} | {fit(80)} | {fit(95)} | {fit(16)} | {r['step_seconds'] * 1e3:.0f} ms | "
                    f"{r['wall_s']:.0f} s ({r['compile_s']:.0f} s) |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, results: dict) -> None:
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    remats = sorted({r.get("remat", "none") for r in results.values() if r["status"] == "ok"})
    table = (f"{BEGIN}\n(GiB per device; `ModelConfig.remat = {' / '.join(repr(r) for r in remats)}`; written by "
             f"`python benchmarks/plan_table.py`)\n\n{markdown(results)}{END}")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "plan.md"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    p.add_argument("--only", default=",".join(MODELS), help="models, e.g. 1b,3b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--devices", default=",".join(map(str, DEVICES)), help="in the order to run them")
    p.add_argument("--remat", default="full", choices=("none", "full", "save_dots"), help="ModelConfig.remat")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for n in map(int, args.devices.split(",")):  # every model on 8 devices first, then 64, then 256
        for model in args.only.split(","):
            for method in args.methods.split(","):
                key = f"{model}/{method}/{n}"
                if key in results and results[key]["status"] == "ok" and results[key].get("remat") == args.remat:
                    continue
                print(f"{key}: jaxpost {' '.join(command(model, method, n, args.remat))}", flush=True)
                results[key] = run_cell(model, method, n, args.timeout, args.remat)
                r = results[key]
                print(f"  -> {r['status']} in {r['wall_s']:.0f} s"
                      + (f", peak {r['peak'] / GiB:.1f} GiB" if r["status"] == "ok" else f" {r.get('error', '')}"),
                      flush=True)
                RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
                write_markdown(Path(args.out), results)


if __name__ == "__main__":
    main()
