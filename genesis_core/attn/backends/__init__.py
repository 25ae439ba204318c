"""Attention backends: importing this package registers every backend (probing stays lazy).

Registry order is data: each file registers with a rank (see registry.register), not import order.
"""
from . import fa2, fa3, fa4, flash, pytorch, sage, sage2, sdpa, xformers  # noqa: F401  (registration side effects)
from . import fa3_fp8, fp8_cudnn  # noqa: F401  (the FP8 backends: Genesis quantisation + FA3 / cuDNN)
