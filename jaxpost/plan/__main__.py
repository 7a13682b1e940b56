"""``python -m jaxpost.plan ...``: the same as ``jaxpost plan ...`` (what the re-run in a subprocess calls)."""

import sys

from jaxpost.cli import main

sys.exit(main(["plan", *sys.argv[1:]]))
