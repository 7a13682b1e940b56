"""Continual rounds from live user feedback: watch a directory of feedback logs, train, gate, publish.

    jaxpost train --gin_file=configs/runs/continual.gin --gin.continual.run_dir=runs/live \\
        --gin.continual.init_from=runs/sft/final --gin.continual.feedback_dir=feedback \\
        --gin.continual.eval_data=heldout.jsonl

When the new files of ``feedback_dir`` (format: ``docs/feedback.md``) hold
``min_records`` records, one round trains on them from the latest accepted
model, with the offline model ``init_from`` as the reference: KTO on thumbs
up/down and ratings (desirable when ``>= rating_threshold``), DPO on choices,
KTO then DPO when a round has both. The round's model is scored on the
held-out feedback ``eval_data`` (:func:`jaxpost.continual.held_out_score`,
lower is better) and published as ``snapshots/NNNN`` only if the score does
not regress by more than ``tolerance``; otherwise the previous model stays
current and ``state.json`` says why. Kill it at any moment and run the same
command again: nothing is lost and no file trains twice (see
:mod:`jaxpost.continual`). ``wait=False`` runs the rounds the directory allows
now and exits; ``max_rounds`` bounds the rounds recorded in ``run_dir``.
"""

from __future__ import annotations

import time

import gin

from jaxpost.config import check_values
from jaxpost.continual import Ledger, decide, held_out_score, load_round_records, publish, read_json, write_json
from jaxpost.data import feedback
from jaxpost.errors import UserError
from jaxpost.hub import resolve_model_dir
from jaxpost.recipes.dpo import dpo
from jaxpost.recipes.kto import kto
from jaxpost.train.run_dir import prepare_run_dir, release_run_dirs, write_summary


@gin.configurable
def continual(run_dir: str = gin.REQUIRED, feedback_dir: str = gin.REQUIRED, init_from: str = gin.REQUIRED,
              eval_data: str = gin.REQUIRED, min_records: int = 64, rating_threshold: float = 4.0,
              tolerance: float = 0.0, max_rounds: int | None = None, wait: bool = True, poll_seconds: float = 30.0,
              seq_len: int = 512, batch_size: int = 8) -> dict:
    """Runs feedback rounds until ``max_rounds`` are recorded (or, with ``wait=False``, none is ready).

    ``seq_len``/``batch_size`` go to each round's KTO and DPO runs and the
    held-out scoring; their other settings (``LoopConfig``,
    ``make_optimizer``, ``make_kto_loss``, ``make_dpo_loss``) are the gin
    bindings. Summary: rounds recorded, accepted, the current model and score.
    """
    check_values("continual", locals())  # for callers that bypass gin; `jaxpost train` ran them
    resolve_model_dir(init_from, key="continual.init_from")  # the inputs are found before the run directory is made
    feedback.feedback_files(feedback_dir, key="continual.feedback_dir")
    unpaired, pairs = feedback.training_rows(feedback.read_feedback(eval_data, "continual.eval_data"), rating_threshold)
    if not unpaired and not pairs:
        raise UserError(f"continual.eval_data={eval_data!r} holds no feedback record; the held-out feedback gates "
                        "every round (docs/feedback.md)")
    run = prepare_run_dir(run_dir)
    score = lambda model: held_out_score(model, init_from, unpaired, pairs, seq_len=seq_len, batch_size=batch_size)
    ledger = Ledger(run)
    if ledger.state is None:
        ledger.start(init_from, score(init_from))
    elif ledger.state["init_from"] != init_from:
        raise UserError(f"{run} holds continual rounds from {ledger.state['init_from']}, not {init_from}; give this "
                        f"model its own continual.run_dir")
    while max_rounds is None or len(ledger.state["rounds"]) < max_rounds:
        plan = ledger.pending() or ledger.plan(feedback_dir, min_records)
        if plan is None:
            if not wait:
                break
            time.sleep(poll_seconds)
            continue
        result = read_json(ledger.round_dir(plan["round"]) / "result.json")
        if result is None:  # not decided yet: train (resuming what a killed process left) and score
            result = _train_and_score(ledger, plan, feedback_dir, init_from, rating_threshold, tolerance, score,
                                      seq_len, batch_size)
            prepare_run_dir(run_dir)  # each round's runs release every lock of this process when they finish
        publish(ledger, plan, result["candidate"], result)
        ledger.record(plan, result)
        print(f"[jaxpost] continual round {plan['round']}: {'accepted' if result['accepted'] else 'rejected'} "
              f"({result['reason']}); files {[f['name'] for f in plan['files']]}; current model "
              f"{ledger.state['current']['model']}", flush=True)
    rounds = ledger.state["rounds"]
    summary = {"rounds": len(rounds), "accepted": sum(r["accepted"] for r in rounds),
               "current": ledger.state["current"]["model"], "score": ledger.state["current"]["score"]}
    write_summary(run, summary)
    release_run_dirs()
    return summary


def _train_and_score(ledger: Ledger, plan: dict, feedback_dir: str, init_from: str, rating_threshold: float,
                     tolerance: float, score, seq_len: int, batch_size: int) -> dict:
    """One round's runs (KTO, then DPO, each skipped once finished) and the gate; writes ``result.json``."""
    rdir, n = ledger.round_dir(plan["round"]), plan["round"]
    unpaired, pairs = feedback.training_rows(load_round_records(feedback_dir, plan), rating_threshold)
    model, methods, metrics = plan["parent"]["model"], [], {}
    try:
        for name, rows in (("kto", unpaired), ("dpo", pairs)):
            if not rows:
                continue
            methods.append(name)
            sub, data = str(rdir / name), str(rdir / f"{name}.jsonl")
            if not (rdir / name / "summary.json").exists():  # a finished run is not run again
                feedback.write_rows(data, rows)
                if name == "kto":
                    kto(run_dir=sub, train_data=data, init_from=model, reference_from=init_from, seq_len=seq_len,
                        batch_size=batch_size)
                else:
                    dpo(run_dir=sub, train_data=data, init_from=model, reference_from=init_from, seq_len=seq_len,
                        batch_size=batch_size)
            model = str(rdir / name / "final")
        metrics = score(model)
        accepted, reason = decide(metrics, plan["parent"]["score"], tolerance)
    except FloatingPointError as e:  # NonFiniteLossError: the round's run stopped itself
        release_run_dirs()
        metrics, accepted, reason = {"score": None}, False, f"training stopped: {str(e).splitlines()[0]}"
    result = {"accepted": accepted, "reason": reason, "score": metrics["score"], "metrics": metrics,
              "previous_score": plan["parent"]["score"], "methods": methods, "candidate": model,
              "model_version": f"round-{n:04d}",
              "snapshot": str(ledger.run_dir / "snapshots" / f"{n:04d}") if accepted else None}
    write_json(rdir / "result.json", result)
    return result
