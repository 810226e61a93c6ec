"""``python -m din_fast``: the din-fast command."""

import sys

from .ctr.cli import main

sys.exit(main())
