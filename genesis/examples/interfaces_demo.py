"""``python -m genesis.examples.interfaces_demo``: the spec's demos (see genesis_core.examples.interfaces_demo)."""
import sys

from genesis_core.examples.interfaces_demo import *  # noqa: F401,F403
from genesis_core.examples.interfaces_demo import main

if __name__ == "__main__":
    sys.exit(main())
