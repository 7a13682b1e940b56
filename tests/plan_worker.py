"""Runs many ``jaxpost plan`` commands in one planning process, one after another (for ``tests/test_plan.py``).

    python tests/plan_worker.py   # XLA_FLAGS=jaxpost.plan.plan_xla_flags(8), JAX_PLATFORMS=cpu

A ``jaxpost plan`` run from a process without ``--devices`` CPU devices and the
planning flags re-runs itself in a subprocess (``jaxpost.plan``, ``_reexec``),
which imports JAX and jaxpost anew, several seconds each time. This process is
started as that subprocess is (``XLA_FLAGS`` from :func:`jaxpost.plan.plan_xla_flags`,
``JAX_PLATFORMS=cpu``), so ``jaxpost plan --devices 8`` runs here in-process,
through the same ``jaxpost.cli.main`` as the command line, and the start-up is
paid once for every plan of the test module.

Each line on stdin is a JSON request, answered by one JSON line on stdout:

* ``{"argv": [...], "out": PATH, "err": PATH}``: ``jaxpost plan ARGV``;
* ``{"python": [FILE, ...], "out": PATH, "err": PATH}``: ``python FILE ...`` (run as ``__main__``);

with file descriptors 1 and 2 redirected to ``out`` and ``err`` while it runs
(so they hold everything the command prints, as a subprocess's would). The
answer is ``{"rc": EXIT_STATUS}``; an exception that escapes the command (a bug) is
printed to ``err`` and gives 1, as it would end a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
import traceback

DEVICES = 8


@contextlib.contextmanager
def _fds_to(out: str, err: str):
    """Points file descriptors 1 and 2 (and ``sys.stdout``/``sys.stderr``) at the files ``out`` and ``err``."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _run(request: dict) -> int:
    import gin

    from jaxpost.cli import main

    gin.clear_config()  # a fresh process's gin registry, as for `jaxpost plan`
    try:
        if "python" in request:
            old_argv, sys.argv = sys.argv, [str(a) for a in request["python"]]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            finally:
                sys.argv = old_argv
            return 0
        return main(["plan", *[str(a) for a in request["argv"]]])
    except SystemExit as e:  # argparse's error exit: the status (and message) the process would have exited with
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


def serve() -> int:
    from jaxpost.plan import _process_has

    answers = os.fdopen(os.dup(1), "w")  # fd 1 is the command's output while one runs
    if not _process_has(DEVICES):
        raise SystemExit(f"plan_worker: this process lacks {DEVICES} CPU devices or the planning XLA flags "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        with _fds_to(request["out"], request["err"]):
            try:
                rc = _run(request)
            except Exception:  # noqa: BLE001 -- a bug in the command: its traceback ends the test's output
                traceback.print_exc()
                rc = 1
        answers.write(json.dumps({"rc": rc}) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
