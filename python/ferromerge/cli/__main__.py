"""``python -m ferromerge.cli``: the ``ferromerge`` command."""

import sys

from . import main

sys.exit(main())
