"""`jaxpost demo` at a reduced size: every stage improves on the stage before it."""

from __future__ import annotations

import json

import pytest

from jaxpost.demo import run_demo


@pytest.mark.slow
def test_demo_quick_every_stage_improves(tmp_path):
    table = run_demo(tmp_path / "demo", quick=True, log=lambda s: None)
    stages = [row["stage"] for row in table]
    assert stages[:2] == ["init", "sft"] and "reward" in stages and "ppo" in stages
    assert stages[-1] == "distill"  # the smaller student, distilled from GRPO, must beat SFT
    for row in table[1:]:
        assert row["improved"], f"stage {row['stage']} did not beat {row['baseline']}: {row}"
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| ppo |" in report and "| grpo |" in report and "| distill |" in report
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == json.loads(json.dumps(table))


def test_demo_refuses_an_out_dir_holding_an_earlier_run(tmp_path, capsys):
    from jaxpost.cli import main

    (tmp_path / "demo" / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "demo" / "grpo").mkdir()
    with pytest.raises(FileExistsError, match=r"already holds a demo run \(stages sft, grpo\).*--resume"):
        run_demo(tmp_path / "demo", quick=True, log=lambda s: None)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    assert "--out NEW_DIR" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["grpo", "sft"]  # nothing written or deleted
