"""``python -m metalearn``: the ``metalearn`` command."""

import sys

from metalearn.cli import main

sys.exit(main())
