"""Attention backends: importing this package registers every backend (probing stays lazy).

Order here is the registry order, which is also the order ``explain`` and the backends table show.
"""
from . import flash, sage, xformers, sdpa, pytorch  # noqa: F401  (registration side effects)
