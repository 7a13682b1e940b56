"""``python -m jaxpost ...``: the same commands as the ``jaxpost`` script (see :mod:`jaxpost.cli`)."""

import sys

from jaxpost.cli import main

sys.exit(main())
