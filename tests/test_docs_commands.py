"""Every command README.md and launch/README.md show runs here as typed, from a fresh working directory.

The shell blocks of both files are parsed into commands; each command must
match exactly one entry of :data:`RUN` (run through ``bash`` in a fresh
directory, step counts bound down by appended bindings) or :data:`ELSEWHERE`
(installs that CI runs, the demo that ``test_demo`` runs, cluster commands
that need a TPU pod or SLURM). A new command in the docs that neither lists
fails the test, so the docs cannot drift from what is tested.

The fresh directory holds what a user's checkout holds (``configs/`` and
``launch/``, linked) plus the inputs a command names that a user brings
themselves (their model directory and data; the demo's data, which
``jaxpost demo`` writes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import portpicker
import pytest

from jaxpost.paths import jsonl_lines
from cli_env import subprocess_env
from pipeline_utils import tiny_model_dir
from xla_test_flags import TEST_XLA_FLAGS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "launch" / "README.md")

# Commands shown in the docs that this file does not run, and where they are covered.
ELSEWHERE = {
    r"^pip install -e \. && jaxpost demo$": "tests/test_demo.py runs `python -m jaxpost demo --quick`",
    r"^pip install torch==2\.13\.0 -e \"\.\[test\]\" && python -m pytest": ".ci/run runs it verbatim",
    r"^pip install -e \.$": "installs; CI installs the same way",
    r"^pip install -e '\.\[gpu\]'": "needs NVIDIA GPUs",
    r"^export TPU_NAME=": "a TPU VM pod slice",
    r"^launch/tpu_pod\.sh ": "a TPU VM pod slice",
    r"^sbatch |^squeue |^tail -f runs/slurm-|^scancel ": "a SLURM cluster",
}

STEPS = "--gin.LoopConfig.num_steps=2"
GRPO_STEPS = ("--gin.OnlineConfig.num_rollouts=1 --gin.OnlineConfig.prompts_per_rollout=4 "
              "--gin.RolloutConfig.group_size=4 --gin.RolloutConfig.max_new_tokens=12")
# (pattern of the command as documented, what is appended to bound its length, checks afterwards)
RUN = {
    r"^jaxpost train --gin_file=configs/runs/sft\.gin --gin\.sft\.init_from=my_model": (STEPS, "runs/sft/final"),
    r"^jaxpost train --gin_file=configs/runs/dpo\.gin --gin\.dpo\.init_from=runs/sft/final": (STEPS,
                                                                                          "runs/dpo/final"),
    r"^jaxpost train --gin_file=configs/runs/grpo\.gin": (GRPO_STEPS, "runs/grpo/final"),
    r"^jaxpost train --gin_file=configs/runs/kto\.gin --gin\.kto\.init_from=runs/sft/final": (STEPS,
                                                                                          "runs/kto/final"),
    r"^jaxpost train --gin_file=configs/runs/continual\.gin": ("--gin.continual.wait=False --gin.continual.min_records=8",
                                                               "runs/live/snapshots/0001/feedback.json"),
    r"^jaxpost train --gin_file=configs/runs/sft\.gin --list_keys$": ("", None),
    r"^jaxpost train --gin_file=configs/experiments/demo/sft\.gin --gin\.LoopConfig\.num_steps=50 "
    r"--gin\.sft\.run_dir=runs/my_sft$": ("", "runs/my_sft/final"),
    r"^jaxpost generate --model runs/my_sft/final ": ("--max_new_tokens 8", "samples.jsonl"),
    r"^jaxpost plot runs/my_sft$": ("", "runs/my_sft/curves.png"),
    r"^python - <<'EOF'\nfrom jaxpost\.demo\.task import write_task_data": ("", "runs/local_data/tokenizer"),
    r"^PORT=12355 launch/local\.sh 2 jaxpost train": ("", "runs/local_sft/final"),
    r"^PORT=12356 launch/local\.sh 2 jaxpost train": ("--gin.OnlineConfig.num_rollouts=2", "runs/local_grpo/final"),
    r"^python -c \"from jaxpost import config; config\.parse\(\['configs/mesh/fsdp\.gin'\]\)": ("", None),
    r"^jaxpost plan --gin_file=configs/runs/sft\.gin ": ("", None),
}
# A command's own numbers that stand for a long run: bound down, nothing else changed.
SHORTEN = {"--gin.LoopConfig.num_steps=50": "--gin.LoopConfig.num_steps=4"}


def doc_commands(path: Path) -> list[str]:
    """The commands of a markdown file's ``bash`` blocks: continuations joined, heredocs kept whole."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            line = lines[i].rstrip()
            i += 1
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body = []
                while i < len(lines) and lines[i].strip() != heredoc.group(1):
                    body.append(lines[i])
                    i += 1
                line = "\n".join([line, *body, lines[i] if i < len(lines) else ""])
                i += 1
            commands.append(re.sub(r"\s+#.*$", "", line) if "\n" not in line else line)
    return commands


def _entry(command: str) -> str | None:
    hits = [p for p in (*RUN, *ELSEWHERE) if re.search(p, command)]
    assert len(hits) <= 1, (command, hits)
    return hits[0] if hits else None


def test_every_documented_command_is_run_or_covered_elsewhere():
    unknown = [c for doc in DOCS for c in doc_commands(doc) if _entry(c) is None]
    assert not unknown, f"commands in the docs that no test runs: {unknown}"
    documented = [_entry(c) for doc in DOCS for c in doc_commands(doc)]
    assert set(RUN) <= set(documented), set(RUN) - set(documented)  # no stale entries


def _user_inputs(cwd: Path) -> None:
    """What the commands read that a user brings: their model, their data, their reward module, the demo data."""
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data

    (cwd / "configs").symlink_to(REPO / "configs")  # a checkout: the relative configs/ and launch/ paths
    (cwd / "launch").symlink_to(REPO / "launch")
    tiny_model_dir(cwd / "my_model")
    demo = write_task_data(cwd / "runs/demo/data", n_sft=64, n_pref=32, n_prompts=8, n_eval=8)
    build_tokenizer(None, vocab_size=261).save_pretrained(cwd / "runs/demo/tokenizer")
    data = cwd / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text((demo["sft"]).read_text())
    (data / "pairs.jsonl").write_text(demo["preference"].read_text())
    (data / "prompts.jsonl").write_text(demo["prompts"].read_text())
    pairs = [json.loads(line) for line in demo["preference"].read_text().splitlines()]
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    (data / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    logs = [{**r, "model_version": "sft"} for r in unpaired]
    (data / "heldout_feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs[:8]))
    (cwd / "feedback").mkdir()
    (cwd / "feedback" / "001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs[8:24]))
    reward = re.search(r"```python\n(# my_rewards\.py.*?)```", DOCS[0].read_text(), re.S).group(1)
    (cwd / "my_rewards.py").write_text(reward)


def _env() -> dict[str, str]:
    """A user's shell: no JAXPOST_ variables, CPU, the suite's XLA flags, no torch (tests/cli_env.py)."""
    return subprocess_env({k: v for k, v in os.environ.items() if not k.startswith("JAXPOST_")}, JAX_PLATFORMS="cpu",
                          XLA_FLAGS=TEST_XLA_FLAGS, PYTHONPATH=str(REPO))


def _run_docs(doc: Path, cwd: Path) -> list[tuple[str, str]]:
    env = _env()
    outputs = []
    for command in doc_commands(doc):
        entry = _entry(command)
        if entry not in RUN:
            continue
        extra, expect = RUN[entry]
        typed = command
        for long, short in SHORTEN.items():
            typed = typed.replace(long, short)
        if typed.startswith("PORT="):  # the port must be free on this machine; the doc says so
            typed = re.sub(r"^PORT=\d+", f"PORT={portpicker.pick_unused_port()}", typed)
        proc = subprocess.run(["bash", "-c", f"{typed} {extra}" if extra else typed], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{typed} {extra}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if expect is not None:
            assert (cwd / expect).exists(), (typed, expect, proc.stdout[-2000:])
        outputs.append((typed, proc.stdout + proc.stderr))
    return outputs


def test_readme_commands_run_as_typed(tmp_path):
    _user_inputs(tmp_path)
    outputs = dict(_run_docs(DOCS[0], tmp_path))
    assert len(outputs) == 10
    keys = next(out for cmd, out in outputs.items() if "--list_keys" in cmd)
    plan = next(out for cmd, out in outputs.items() if cmd.startswith("jaxpost plan"))
    assert "fits in 80.00 GiB" in plan and "optimizer state" in plan
    assert "sft.train_data" in keys and "sft.run_dir" in keys
    # Each stage starts from the one before and exports a model the next one (and transformers) loads.
    for stage in ("sft", "dpo", "grpo"):
        card = (tmp_path / f"runs/{stage}/final/README.md").read_text()
        assert stage in card.lower()
    grpo = [json.loads(line) for line in (tmp_path / "runs/grpo/metrics.jsonl").read_text().splitlines()]
    assert grpo and all(r["step"] == 1 for r in grpo)
    samples = jsonl_lines((tmp_path / "samples.jsonl").read_text(encoding="utf-8"))
    assert len(samples) == 4 * len((tmp_path / "runs/demo/data/prompts.jsonl").read_text().splitlines())


def test_launch_readme_commands_run_as_typed(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "launch").symlink_to(REPO / "launch")
    outputs = _run_docs(DOCS[1], tmp_path)
    assert len(outputs) == 4
    grpo = [json.loads(line) for line in (tmp_path / "runs/local_grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in grpo] == [1, 2] and all(0 <= r["objective/scores"] <= 1 for r in grpo)
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/local_sft/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert (tmp_path / "runs/local_logs/process_1.log").exists()
    # The doc's next sentence: the same command again with more steps resumes from the checkpoint at step 6.
    launch = next(cmd for cmd, _ in outputs if cmd.startswith("PORT="))
    port = portpicker.pick_unused_port()
    again = re.sub(r"^PORT=\d+", f"PORT={port}", launch) + " --gin.LoopConfig.num_steps=12"
    env = _env()
    proc = subprocess.run(["bash", "-c", again], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from step 6" in proc.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/local_sft/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12
