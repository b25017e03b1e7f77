"""``python -m megafold`` is the ``megafold`` command."""

import sys

from megafold.cli import main

sys.exit(main())
