"""``python -m runjournal``: the same as the ``runjournal`` command."""

import sys

from runjournal._cli import main

sys.exit(main())
