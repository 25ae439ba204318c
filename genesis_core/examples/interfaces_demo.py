"""The spec's examples, runnable: ``python -m genesis.examples.interfaces_demo`` (or ``python -m genesis_core demo``).

Each ``demo_*`` function runs one example of genesis-core-interfaces.txt as written. Where an
example names hardware this machine lacks (CUDA, FlashAttention), it says so and runs the rest.
"""
from __future__ import annotations

import sys

import torch


def _title(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 60 - len(text)))


def demo_comfyui_compatibility() -> None:
    """Spec section 1: a node written against ComfyUINodeInterface and registered by name."""
    _title("1. ComfyUI compatibility interface")
    from genesis_core import COMFYUI_NODE_REGISTRY, ComfyUINodeInterface, register_comfyui_node

    @register_comfyui_node("MyCustomNode")
    class MyNode(ComfyUINodeInterface):
        CATEGORY = "genesis/custom"

        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "text": ("STRING", {"default": ""}),
                    "value": ("INT", {"default": 42}),
                }
            }

        @classmethod
        def RETURN_TYPES(cls):
            return ("OUTPUT",)

        def execute(self, text, value):
            result = f"{text}: {value}"
            return (result,)

    node_cls = COMFYUI_NODE_REGISTRY["MyCustomNode"]
    print(f"registered: MyCustomNode -> {node_cls.__name__}; RETURN_TYPES={node_cls.RETURN_TYPES}, "
          f"FUNCTION={node_cls.FUNCTION!r}, CATEGORY={node_cls.CATEGORY!r}")
    print(f"execute('answer', 42) -> {getattr(node_cls(), node_cls.FUNCTION)('answer', 42)}")


def demo_heterogeneous_computing() -> None:
    """Spec section 2: register backends, execute on one, run splits in parallel."""
    _title("2. Heterogeneous computing interface")
    from genesis_core import ComputeBackend, HeterogeneousExecutor

    executor = HeterogeneousExecutor()
    backends = [ComputeBackend.CPU]
    try:
        executor.register_backend(ComputeBackend.CUDA, torch.device("cuda:0"))
        backends.append(ComputeBackend.CUDA)
    except (RuntimeError, ValueError) as exc:
        print(f"CUDA not registered: {exc}")
    executor.register_backend(ComputeBackend.CPU, torch.device("cpu"))
    target = backends[-1]

    def my_computation(x):
        return x * 2 + 1

    x = torch.randn(100, 100)
    result = executor.execute_on_backend(target, my_computation, x)
    print(f"execute_on_backend({target.value}): shape {tuple(result.shape)}, device {result.device}, "
          f"max |result - (2x+1)| = {(result - (x * 2 + 1)).abs().max().item():.2e}")
    data1, data2 = torch.randn(64, 100), torch.randn(64, 100)
    results = executor.parallel_execute(
        my_computation,
        data_splits=[data1, data2],
        backends=[ComputeBackend.CPU, target],
    )
    print(f"parallel_execute over {[b.value for b in (ComputeBackend.CPU, target)]}: "
          f"{[tuple(r.shape) for r in results]}")


def demo_cross_attention() -> None:
    """Spec section 3: image features attend to text embeddings."""
    _title("3. Cross-attention interface")
    from genesis_core import CrossAttentionModule, last_backend

    cross_attn = CrossAttentionModule(query_dim=512, context_dim=768, num_heads=8)
    image_features = torch.randn(2, 256, 512)  # [B, N, D]
    text_embeddings = torch.randn(2, 77, 768)  # [B, M, C]
    output = cross_attn.forward(query=image_features, key=text_embeddings, value=text_embeddings)
    print(f"output {tuple(output.shape)}, served by '{last_backend()}'")
    query, key = image_features, text_embeddings  # the spec's snippet leaves these names to the reader
    attn_weights = cross_attn.compute_attention_weights(query, key, mask=None)
    print(f"attention weights {tuple(attn_weights.shape)}; rows sum to 1: "
          f"{torch.allclose(attn_weights.sum(-1), torch.ones(()), atol=1e-5)}")


def demo_adaptive_attention() -> None:
    """Spec section 4: switch attention implementations at run time."""
    _title("4. Multi-attention switching interface")
    from genesis_core import AdaptiveAttentionSwitch, AttentionType, last_backend

    adaptive_attn = AdaptiveAttentionSwitch(embed_dim=512, num_heads=8, default_type=AttentionType.FLASH_ATTENTION)
    available = adaptive_attn.get_available_attentions()
    print(f"Available: {[t.value for t in available]}")
    adaptive_attn.set_attention_type(AttentionType.XFORMERS)  # warns and falls back where xformers is absent
    x = torch.randn(2, 128, 512)
    output = adaptive_attn.forward(x)
    print(f"forward with '{adaptive_attn.attention_type.value}' -> {tuple(output.shape)}, served by '{last_backend()}'")
    query = key = value = x
    output = adaptive_attn.forward_with_type(AttentionType.SDPA, query, key, value)
    print(f"forward_with_type(SDPA) -> {tuple(output.shape)}, served by '{last_backend()}'")
    context = torch.randn(2, 64, 512)
    output = adaptive_attn.forward(x, context=context)
    print(f"cross-attention mode -> {tuple(output.shape)}, served by '{last_backend()}'")


def demo_factory() -> None:
    _title("Factory function")
    from genesis_core import create_attention_interface

    cross_attn = create_attention_interface("cross", embed_dim=512, context_dim=768, num_heads=8)
    adaptive_attn = create_attention_interface("adaptive", embed_dim=512, num_heads=8)
    print(f"cross -> {type(cross_attn).__name__}, adaptive -> {type(adaptive_attn).__name__}")


def demo_interface_info() -> None:
    _title("Interface information")
    from genesis_core import get_interface_info

    info = get_interface_info()
    print(f"ComfyUI nodes: {info['comfyui']['registered_nodes']}")
    print(f"Compute backends: {info['heterogeneous_compute']['backends']}")
    print(f"Attention types: {info['multi_attention']['types']}")


def main() -> int:
    torch.manual_seed(0)
    demos = (demo_comfyui_compatibility, demo_heterogeneous_computing, demo_cross_attention,
             demo_adaptive_attention, demo_factory, demo_interface_info)
    for demo in demos:
        demo()
    _title("Attention backends")
    from genesis_core.info import print_backends_table

    print_backends_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
