"""``python -m pipeline.cli``: the same as the ``jacpipe`` command (Ray Jobs entrypoints use it)."""

import sys

from pipeline.cli.app import main

sys.exit(main())
