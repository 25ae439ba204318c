"""Genesis on many GPUs and hosts: sequence-parallel attention, CFG-parallel model calls, workers placed by Ray.

* :mod:`.mesh`      the process groups: CFG axis x sequence mesh (Ulysses x ring)
* :mod:`.shard`     cutting a token sequence into padded shards and joining them back
* :mod:`.sequence`  ``sequence_attention``: Ulysses / ring / both, local part through Genesis dispatch
* :mod:`.cfg`       splitting a model call's batch into its cond / uncond branches and joining the results
* :mod:`.launch`    local worker processes in one torch.distributed group (tests, benchmarks)
* :mod:`.ray_workers`   one Ray actor per GPU (or CPU worker), a process group among them, model kept per actor
* :mod:`.ray_placement` ``parallel_execute``-style data splits on the GPUs of several hosts through Ray

Importing this package imports neither Ray nor anything that initialises torch.distributed; Ray is imported
only when a Ray function runs (``pip install comfyui-genesis[ray]``).
"""
from __future__ import annotations

from .mesh import ParallelMesh, build_mesh, mesh_ranks, shard_sizes
from .sequence import attention_with_lse, group_mesh, sequence_attention
from .shard import gather_tokens, split_tokens, unpad_tokens

__all__ = [
    "ParallelMesh",
    "attention_with_lse",
    "build_mesh",
    "gather_tokens",
    "group_mesh",
    "mesh_ranks",
    "sequence_attention",
    "shard_sizes",
    "split_tokens",
    "unpad_tokens",
]
