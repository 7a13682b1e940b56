"""Continual rounds from live feedback: the run directory's state, the held-out gate, snapshots.

The recipe :func:`jaxpost.recipes.continual.continual` drives the rounds;
what it needs to survive a kill at any moment lives here.

Run directory::

    state.json                 the ledger (atomic): current model, every round, the pending round
    rounds/0001/plan.json      the files the round takes (+ sha256), fixed before it trains
    rounds/0001/kto.jsonl      its training rows (unpaired, for KTO) / dpo.jsonl (pairs, for DPO)
    rounds/0001/kto/, dpo/     the round's runs (jaxpost run directories: checkpoints, metrics, final/)
    rounds/0001/result.json    the gate's decision (atomic), written before the snapshot moves
    snapshots/0001/            an accepted round's model (Hugging Face directory) + feedback.json

A round is *pending* from ``plan.json`` until ``state.json`` records its
result; a restart finishes the pending round with the same files (its runs
resume from their checkpoints; a finished run is not run again) before it
takes new ones. A feedback file is *consumed* when ``state.json`` lists it
in a recorded round, and never trained again.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Any, Callable

from jaxpost import paths
from jaxpost.data import feedback
from jaxpost.distributed import is_main_process
from jaxpost.errors import UserError

STATE = "state.json"


def read_json(path) -> Any:
    p = paths.resolve(path)
    return json.loads(p.read_text()) if p.exists() else None


def write_json(path, value: Any) -> None:
    """Writes ``value`` atomically from the main process (every process holds the same ledger)."""
    if is_main_process():
        paths.atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


class Ledger:
    """``state.json``: ``current`` (model, score, round), ``rounds`` (recorded results) and ``invalid`` files."""

    def __init__(self, run_dir):
        self.run_dir = paths.resolve(run_dir)
        self.state = read_json(self.run_dir / STATE)
        self._warned: set[str] = set()

    def start(self, init_from: str, score: dict) -> None:
        self.state = {"version": 1, "init_from": init_from, "rounds": [], "invalid": {},
                      "current": {"round": 0, "model": init_from, "score": score["score"], "metrics": score}}
        self.save()

    def save(self) -> None:
        write_json(self.run_dir / STATE, self.state)

    def consumed(self) -> dict[str, str]:
        """``{file name: sha256}`` of every file a recorded round took."""
        return {f["name"]: f["sha256"] for r in self.state["rounds"] for f in r["files"]}

    def round_dir(self, n: int):
        return self.run_dir / "rounds" / f"{n:04d}"

    def pending(self) -> dict | None:
        """The plan of the round started but not recorded, or None."""
        n = len(self.state["rounds"]) + 1
        return read_json(self.round_dir(n) / "plan.json")

    def plan(self, feedback_dir: str, min_records: int) -> dict | None:
        """Fixes the next round's files (all new, valid ones) when they hold ``min_records`` records, else None.

        A file that fails validation is reported, recorded in ``invalid`` by
        its sha256 and skipped until it changes.
        """
        consumed, invalid = self.consumed(), self.state["invalid"]
        files, total = [], 0
        for name in feedback.feedback_files(feedback_dir):
            path = os.path.join(os.fspath(feedback_dir), name)
            digest = feedback.file_digest(path)
            if name in consumed:
                if consumed[name] != digest and name not in self._warned:
                    self._warned.add(name)
                    print(f"[jaxpost] continual: {name} changed after a round trained on it; the change is ignored "
                          f"(add new feedback as new files)", flush=True)
                continue
            if invalid.get(name, {}).get("sha256") == digest:
                continue
            try:
                records = feedback.read_feedback(path)
            except UserError as e:
                print(f"[jaxpost] continual: skipping {name}: {e}", flush=True)
                invalid[name] = {"sha256": digest, "error": str(e)}
                self.save()
                continue
            invalid.pop(name, None)
            files.append({"name": name, "sha256": digest, "records": len(records)})
            total += len(records)
        if not files or total < min_records:
            return None
        plan = {"round": len(self.state["rounds"]) + 1, "files": files, "parent": self.state["current"]}
        write_json(self.round_dir(plan["round"]) / "plan.json", plan)
        return plan

    def record(self, plan: dict, result: dict) -> None:
        """Makes the round's result final: its files are consumed, an accepted snapshot becomes current."""
        entry = {"round": plan["round"], "files": plan["files"], "parent_round": plan["parent"]["round"], **result}
        self.state["rounds"].append(entry)
        if result["accepted"]:
            self.state["current"] = {"round": plan["round"], "model": result["snapshot"], "score": result["score"],
                                     "metrics": result["metrics"]}
        self.save()


def lineage(ledger: Ledger, plan: dict) -> list[str]:
    """Every feedback file that trained the round's model: its own and those of the accepted rounds before it."""
    accepted = {r["round"]: r for r in ledger.state["rounds"] if r["accepted"]}
    names, n = [f["name"] for f in plan["files"]], plan["parent"]["round"]
    while n:
        names = [f["name"] for f in accepted[n]["files"]] + names
        n = accepted[n]["parent_round"]
    return names


def load_round_records(feedback_dir: str, plan: dict) -> list[dict]:
    """The records of the plan's files, checked to be the bytes the plan fixed."""
    records = []
    for f in plan["files"]:
        path = os.path.join(os.fspath(feedback_dir), f["name"])
        if feedback.file_digest(path) != f["sha256"]:
            raise UserError(f"{path} changed while round {plan['round']} was training on it; restore it (sha256 "
                            f"{f['sha256']}) or delete {paths.resolve(path).parent} from the round")
        records += feedback.read_feedback(path)
    return records


def decide(score: dict, previous: float, tolerance: float) -> tuple[bool, str]:
    """Accept when the held-out score (lower is better) is finite and at most ``previous + tolerance``."""
    s = score["score"]
    if not math.isfinite(s):
        return False, f"held-out score is {s}"
    if s > previous + tolerance:
        return False, f"held-out score regressed: {s:.6g} > {previous:.6g} (previous) + {tolerance:g} (tolerance)"
    return True, f"held-out score {s:.6g} <= {previous:.6g} (previous) + {tolerance:g}"


def publish(ledger: Ledger, plan: dict, candidate: str | None, result: dict) -> None:
    """Moves an accepted candidate to ``snapshots/NNNN`` with its ``feedback.json``; idempotent after a kill."""
    if not result["accepted"]:
        return
    snap = ledger.run_dir / "snapshots" / f"{plan['round']:04d}"
    if not snap.exists() and is_main_process():
        paths.move(candidate, snap)
    write_json(snap / "feedback.json", {
        "model_version": result["model_version"], "round": plan["round"], "files": plan["files"],
        "trained_on": lineage(ledger, plan), "parent": plan["parent"]["model"],
        "reference": ledger.state["init_from"], "score": result["score"], "metrics": result["metrics"]})


def held_out_score(model_dir: str, reference_dir: str, unpaired: list[dict], pairs: list[dict], *, seq_len: int,
                   batch_size: int) -> dict[str, float]:
    """The gate: held-out KTO loss (labels, ratings) + DPO loss (choices) of ``model_dir``, lower is better.

    Both against ``reference_dir`` (the offline model), with the losses as
    gin configures them for training (``make_kto_loss``, ``make_dpo_loss``).
    Returns ``{"score", "kto/loss", "kto/rewards/margins", ..., "dpo/loss", ...}``.
    """
    from jaxpost.algorithms import make_dpo_loss
    from jaxpost.algorithms.kto import make_kto_loss
    from jaxpost.data import load_tokenizer, make_preference_pipeline
    from jaxpost.data.unpaired import make_unpaired_pipeline
    from jaxpost.hub import resolve_tokenizer_dir
    from jaxpost.models.load import load_model
    from jaxpost.sharding import Partitioner
    from jaxpost.train import make_eval_step
    from jaxpost.train.batches import MeshBatches
    from jaxpost.train.fit import make_evaluator

    part = Partitioner()
    tok = load_tokenizer(resolve_tokenizer_dir(model_dir, key="continual held-out model"))
    config, graphdef, params = load_model(None, model_dir, part)
    _, _, ref = load_model(None, reference_dir, part)
    out: dict[str, float] = {}
    parts: list[tuple[str, Callable, Callable, list]] = [
        ("kto", make_kto_loss, lambda r: make_unpaired_pipeline(r, tok, seq_len, batch_size, num_epochs=1,
                                                                shuffle=False), unpaired),
        ("dpo", make_dpo_loss, lambda r: make_preference_pipeline(r, tok, seq_len, batch_size, num_epochs=1,
                                                                  shuffle=False), pairs)]
    with part.activate():
        for name, make_loss, pipeline, rows in parts:
            if rows:
                evaluate = make_evaluator(make_eval_step(make_loss(graphdef, config)),
                                          lambda: MeshBatches(pipeline(rows), part), 1 << 30, {"reference": ref})
                out.update({f"{name}/{k}": v for k, v in evaluate(SimpleNamespace(params=params)).items()})
    out["score"] = sum(out[f"{n}/loss"] for n in ("kto", "dpo") if f"{n}/loss" in out)
    return out
