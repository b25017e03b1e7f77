"""``python -m megafold.precache SRC... --out STORE``: the precache CLI without the ``megafold`` entry point."""

import sys

from megafold.precache.build import build_main

sys.exit(build_main())
