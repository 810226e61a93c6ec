"""``python -m din_fast``: the din-fast command."""

import sys

from .cli import main

sys.exit(main())
