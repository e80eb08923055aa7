"""``python -m ferromerge``: the ``ferromerge`` command, as ``python -m ferromerge.cli`` is (users try the package's
name first)."""

import sys

from .cli import main

sys.exit(main())
