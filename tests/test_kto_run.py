"""KTO end to end from TRL's unpaired format (plain and conversational), through `jaxpost train` as a user types it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxpost import cli
from pipeline_utils import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def letters_feedback(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """Thumbs up for replies drawn from 'abcd', down for replies from 'efgh' (TRL's unpaired rows)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(4))
        good = rng.random() < 0.5
        reply = "".join(rng.choice("abcd" if good else "efgh") for _ in range(rng.randint(2, 5)))
        prompt, completion = f"say: {word} ", reply
        if conversational:
            prompt, completion = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": reply}]
        rows.append({"prompt": prompt, "completion": completion, "label": good})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SMALL = ["--gin.kto.seq_len=48", "--gin.kto.batch_size=8", "--gin.LoopConfig.log_every=5",
         "--gin.LoopConfig.progress=False", "--gin.make_optimizer.warmup_steps=0"]


def test_kto_run_from_trl_unpaired_rows_via_the_cli(tmp_path, monkeypatch):
    """The command as a user types it: trains, raises the held-out margin, exports a model directory."""
    model = tiny_model_dir(tmp_path / "my_model")
    write_jsonl(tmp_path / "feedback.jsonl", letters_feedback(200))
    monkeypatch.chdir(tmp_path)
    argv = ["train", f"--gin_file={REPO}/configs/runs/kto.gin", f"--gin.kto.init_from={model}",
            "--gin.kto.train_data=feedback.jsonl", "--gin.kto.run_dir=runs/kto", "--gin.kto.eval_fraction=0.2",
            "--gin.LoopConfig.num_steps=12", "--gin.make_optimizer.learning_rate=3e-3", "--gin.make_kto_loss.beta=0.5",
            *SMALL]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "runs/kto/summary.json").read_text())
    assert summary["step"] == 12 and summary["loss_kind"] == "kto"
    for key in ("eval/loss", "eval/kl", "eval/rewards/chosen", "eval/rewards/rejected", "eval/logps/chosen"):
        assert key in summary, key
    assert summary["eval/rewards/margins"] > 0.1, summary  # desirable replies gained on undesirable ones
    assert summary["eval/loss"] < 0.5  # the loss of the reference itself (policy = reference: 1 - sigma(0))
    metrics = [json.loads(line) for line in (tmp_path / "runs/kto/metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(metrics[-1])
    final = tmp_path / "runs/kto/final"
    assert (final / "config.json").exists() and "kto" in (final / "README.md").read_text()


def test_kto_conversational_rows_and_errors(tmp_path, capsys):
    """Conversational unpaired rows run in-process; a bad label is one line naming the file and line."""
    model = tiny_model_dir(tmp_path / "m")
    data = write_jsonl(tmp_path / "chat.jsonl", letters_feedback(24, conversational=True))
    base = ["train", f"--gin_file={REPO}/configs/runs/kto.gin", f"--gin.kto.init_from={model}",
            f"--gin.kto.run_dir={tmp_path / 'run'}", "--gin.LoopConfig.num_steps=2", *SMALL]
    assert cli.main([*base, f"--gin.kto.train_data={data}"]) == 0
    assert (tmp_path / "run/final/config.json").exists()
    rows = letters_feedback(4)
    rows[2]["label"] = "yes"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    capsys.readouterr()
    assert cli.main([*base, f"--gin.kto.train_data={bad}", f"--gin.kto.run_dir={tmp_path / 'bad_run'}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 3" in err and "label" in err, err
    capsys.readouterr()
    assert cli.main([*base, f"--gin.kto.train_data={data}", "--gin.kto.batch_size=1",
                     f"--gin.kto.run_dir={tmp_path / 'b1'}"]) == 2
    assert "batch_size >= 2" in capsys.readouterr().err
