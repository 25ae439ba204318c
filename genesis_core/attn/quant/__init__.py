"""Quantisation of attention inputs for the low-precision kernels (FP8 today: :mod:`.fp8`).

Imports only torch (Triton lazily, inside :mod:`.fp8`, when a Triton kernel is first asked for) and
genesis_core leaf modules, so the backends can use it without importing anything above them.
"""
from .fp8 import (  # noqa: F401  (the public names)
    E4M3,
    E4M3_MAX,
    FP8QKV,
    GRANULARITIES,
    KERNEL_GRANULARITIES,
    MAX_EXPONENT,
    Quantized,
    dequantize,
    dequantize_output,
    dequantize_output_reference,
    granularities,
    head_spread,
    quantize_qkv,
    quantize_qkv_reference,
    quantize_reference,
    scale_exponents,
    triton_missing,
)
