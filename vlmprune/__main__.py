"""``python -m vlmprune``: the command line (:mod:`vlmprune.cli`)."""

import sys

from vlmprune.cli import main

sys.exit(main())
