"""``python -m normattn ...`` is the ``normattn`` command."""

import sys

from .cli import main

sys.exit(main())
