"""`jaxpost plot`: the metrics of one or several runs drawn to PNG."""

import json

import pytest

from jaxpost.cli import main
from jaxpost.plot import plot_runs, series


def _run(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def runs(tmp_path):
    a = _run(tmp_path / "a", [{"step": s, "loss": 2.0 / s, "eval/loss": 3.0 / s} for s in range(1, 6)])
    b = _run(tmp_path / "b", [{"step": s, "loss": 1.0 / s, "objective/kl": 0.1 * s, "note": "text"}
                              for s in range(1, 4)])
    return a, b


def test_series_reads_numeric_values_of_one_metric(runs):
    from jaxpost.train.metrics import read_jsonl

    rows = read_jsonl(runs[1] / "metrics.jsonl")
    assert series(rows, "objective/kl") == ([1, 2, 3], [0.1, 0.2, pytest.approx(0.3)])
    assert series(rows, "note") == ([], [])  # strings are not plotted


def test_plot_command_writes_a_png_of_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(out) in capsys.readouterr().out


def test_metrics_no_run_logged_are_left_out_and_none_left_is_an_error(runs, tmp_path):
    out = plot_runs(runs, tmp_path / "x.png", metrics=["loss", "never/logged"])
    assert out.exists()
    with pytest.raises(ValueError, match=r"None of the metrics \['never/logged'\].*logged: .*'loss'"):
        plot_runs(runs, tmp_path / "y.png", metrics=["never/logged"])


def test_a_broken_metrics_line_is_named(tmp_path):
    run = _run(tmp_path / "r", [{"step": 1, "loss": 1.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        plot_runs([run], tmp_path / "x.png")
