"""``genesis.core``: the spec's import path for the public API of :mod:`genesis_core`."""
from genesis_core import *  # noqa: F401,F403
from genesis_core import __all__  # noqa: F401
