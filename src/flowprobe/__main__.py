"""``python -m flowprobe``: the command line."""

import sys

from flowprobe.cli import main

sys.exit(main())
