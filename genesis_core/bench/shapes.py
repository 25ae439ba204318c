"""What the attention bench measures: named shape sets of diffusion models, ``--shapes`` parsing, dtypes.

``diffusion`` (SD1.5, SDXL, Flux, Wan 480p) is the default set on CUDA; ``video`` (Wan 720p, 75600 tokens)
is added to it by default only when the run's estimate fits its time budget (see ``cli.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int

    @property
    def flops(self) -> float:
        return 4.0 * self.b * self.h * self.nq * self.nk * self.d

    def label(self) -> str:
        return f"{self.name} [B{self.b} H{self.h} Nq{self.nq} Nk{self.nk} D{self.d}]"


SHAPE_SETS: Dict[str, List[Shape]] = {
    # SD1.5 at 512x512 (batch 2: cond + uncond): 64x64 latent level (320 ch, head_dim 40) and 16x16 level (1280 ch, head_dim 160)
    "sd15": [
        Shape("sd15-self-d40", 2, 8, 4096, 4096, 40),
        Shape("sd15-cross-d40", 2, 8, 4096, 77, 40),
        Shape("sd15-self-d160", 2, 8, 256, 256, 160),
        Shape("sd15-cross-d160", 2, 8, 256, 77, 160),
    ],
    # SDXL at 1024x1024: 64x64 level (640 ch = 10 heads x 64), self and 77-token cross attention
    "sdxl": [
        Shape("sdxl-self-4k", 2, 10, 4096, 4096, 64),
        Shape("sdxl-cross-77", 2, 10, 4096, 77, 64),
    ],
    # Flux at 1024x1024: 4096 image + 512 text tokens, 24 heads x 128
    "flux": [Shape("flux-4608", 1, 24, 4608, 4608, 128)],
    # Wan 2.1 14B, 480x832, 81 frames: 21 x 30 x 52 = 32760 tokens, 40 heads x 128
    "wan": [Shape("wan-32k", 1, 40, 32760, 32760, 128)],
    # Wan 2.1 14B, 720x1280, 81 frames: 21 x 45 x 80 = 75600 tokens, 40 heads x 128
    "video": [Shape("wan720-75k", 1, 40, 75600, 75600, 128)],
    # CPU-sized
    "small": [
        Shape("small-self", 1, 4, 256, 256, 64),
        Shape("small-cross", 1, 4, 256, 77, 40),
    ],
    "tiny": [Shape("tiny", 1, 2, 32, 24, 16)],
}
SHAPE_SETS["diffusion"] = SHAPE_SETS["sd15"] + SHAPE_SETS["sdxl"] + SHAPE_SETS["flux"] + SHAPE_SETS["wan"]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_shapes(spec: str) -> List[Shape]:
    """``sd15,flux`` (named sets) and/or ``B,H,Nq,Nk,D`` groups separated by ``;`` or spaces."""
    out: List[Shape] = []
    tokens = [t for part in spec.replace(";", " ").split() for t in ([part] if part.count(",") == 4 and
              all(x.strip().isdigit() for x in part.split(",")) else part.split(","))]
    for tok in tokens:
        tok = tok.strip()
        if not tok:
            continue
        if tok.lower() in SHAPE_SETS:
            out.extend(SHAPE_SETS[tok.lower()])
            continue
        if "," in tok:
            nums = tok.split(",")
            if len(nums) == 5 and all(n.strip().isdigit() and int(n) > 0 for n in nums):
                b, h, nq, nk, d = (int(n) for n in nums)
                out.append(Shape(f"custom-{b}x{h}x{nq}x{nk}x{d}", b, h, nq, nk, d))
                continue
        raise ValueError(
            f"--shapes entry {tok!r} is neither a named set ({', '.join(sorted(SHAPE_SETS))}) "
            f"nor five positive integers B,H,Nq,Nk,D"
        )
    if not out:
        raise ValueError("--shapes named no shape")
    return out
