"""``python -m genesis_core.bench``: the same as ``python -m genesis_core bench``."""
import sys

from .cli import main

sys.exit(main())
