"""An ONNX Runtime session for an exported graph: building it, checking its I/O against the trace, running it.

:func:`new_session` builds the ``InferenceSession`` with the runner's providers and session options.
:func:`compile_session` checks the graph's inputs (``in0..in<n-1>``) and outputs (count, dtypes, fixed shapes)
against what ``fn`` returned while being traced and wraps the session in a :class:`Compiled`. :func:`run_compiled`
runs it: inputs are bound by pointer (``IOBinding``) from contiguous torch tensors on the runner's device, and
outputs are written straight into preallocated torch tensors (their shapes are known from the trace), so CPU
and CUDA calls copy nothing. Providers without pointer binding (WebGPU, DirectML, ...) and graphs with
data-dependent output sizes (``x[x > 0]``) go through numpy, where ONNX Runtime allocates the outputs itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._tree import Slot
from .onnx_cache import from_json_template
from .onnx_errors import OnnxExportError

Provider = Union[str, Tuple[str, Dict[str, Any]]]

_TORCH_TO_NUMPY = {
    torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.int64: "int64",
    torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_ORT_TYPE_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
    "tensor(bfloat16)": torch.bfloat16,
}
# providers whose memory torch can point at directly, and the torch device type they use
_BINDABLE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


@dataclass
class Compiled:
    """A checked session with what running it needs: which flat input feeds which graph input, the outputs'
    names, structure, shapes and dtypes, and whether I/O can be bound by pointer."""

    session: Any
    input_index: List[Tuple[str, int]]  # (session input name, index into the flat inputs)
    output_names: List[str]
    out_template: Any
    out_meta: List[Tuple[Tuple[int, ...], torch.dtype]]
    keepalive: Tuple[Any, ...] = ()
    source: str = "export"
    bindable: bool = True


def provider_name(provider: Provider) -> str:
    """The name of a provider entry given as a name or as ``(name, options)``."""
    return provider[0] if isinstance(provider, tuple) else provider


def default_device_for(providers: Sequence[Provider],
                       provider_options: Optional[Sequence[Dict[str, Any]]] = None) -> torch.device:
    """Where torch tensors should live for the first provider: ``cuda:<device_id>`` for CUDA/TensorRT, else CPU."""
    if not providers:
        return torch.device("cpu")
    first = providers[0]
    name = provider_name(first)
    opts = first[1] if isinstance(first, tuple) else (provider_options[0] if provider_options else {}) or {}
    if _BINDABLE.get(name) == "cuda":
        return torch.device("cuda", int(opts.get("device_id", 0)))
    return torch.device("cpu")


def bind_device_type(providers: Sequence[Provider], device: torch.device) -> Optional[str]:
    """The device type to bind I/O pointers on (``"cpu"``, ``"cuda"``), or None when the first provider cannot
    read torch memory on ``device`` (then I/O goes through numpy)."""
    first = providers[0] if providers else "CPUExecutionProvider"
    bind = _BINDABLE.get(provider_name(first))
    if bind is not None and bind != device.type:
        bind = None
    return bind


def new_session(model: Union[bytes, str], providers: Sequence[Provider],
                provider_options: Optional[Sequence[Dict[str, Any]]], log_severity: int,
                session_config: Dict[str, str]) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (bytes or a path)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    for key, value in session_config.items():
        so.add_session_config_entry(key, str(value))
    kwargs: Dict[str, Any] = {"providers": providers}
    if provider_options is not None:
        kwargs["provider_options"] = provider_options
    return ort.InferenceSession(model, sess_options=so, **kwargs)


def check_template(template: Any, n: int) -> None:
    """Raise ValueError unless ``template`` uses each of the slots ``0..n-1`` exactly once."""
    found: List[int] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Slot):
            found.append(obj.index)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x)

    walk(template)
    if sorted(found) != list(range(n)):
        raise ValueError(f"the output template places tensors {sorted(found)}, expected 0..{n - 1}")


def compile_session(session: Any, n_inputs: int, out_template_json: Any,
                    out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], source: str, provider: str,
                    bind_type: Optional[str], raw_template: Any = None) -> Compiled:
    """``session`` checked against the trace and ready to run; OnnxExportError when its inputs are not
    ``in0..in<n_inputs-1>`` or its outputs differ from ``out_meta`` in count, dtype or fixed shape.

    ``provider`` is the provider asked for first and ``bind_type`` the device type to bind I/O on (see
    :func:`bind_device_type`); outputs with data-dependent sizes, or a session that did not start that provider,
    run through numpy. The output template is ``raw_template``, else read from its JSON form.
    """
    input_index = []
    for inp in session.get_inputs():
        if not inp.name.startswith("in") or not inp.name[2:].isdigit() or int(inp.name[2:]) >= n_inputs:
            raise OnnxExportError(f"unexpected ONNX graph input {inp.name!r} (expected in0..in{n_inputs - 1})")
        input_index.append((inp.name, int(inp.name[2:])))
    outputs = session.get_outputs()
    if len(outputs) != len(out_meta):
        raise OnnxExportError(f"the ONNX graph has {len(outputs)} outputs but the function returned "
                              f"{len(out_meta)} tensors")
    static = []
    for i, (o, (shape, dtype)) in enumerate(zip(outputs, out_meta)):
        if _ORT_TYPE_TO_TORCH.get(o.type, dtype) != dtype:
            raise OnnxExportError(f"ONNX graph output {i} is {o.type}, but the function returned "
                                  f"{str(dtype).replace('torch.', '')}")
        dims = list(o.shape) if o.shape is not None else None
        fixed = dims is not None and all(isinstance(d, int) for d in dims)
        if fixed and tuple(dims) != tuple(shape):
            raise OnnxExportError(f"ONNX graph output {i} has shape {dims}, but the function returned "
                                  f"{list(shape)}")
        static.append(fixed)  # data-dependent sizes (x[x > 0]): let ONNX Runtime allocate the output
    bindable = bind_type is not None and session.get_providers()[:1] == [provider] and all(
        _ORT_TYPE_TO_TORCH.get(o.type) == dtype and dtype in _TORCH_TO_NUMPY and all(shape) and fixed
        for o, (shape, dtype), fixed in zip(outputs, out_meta, static))
    template = raw_template if raw_template is not None else from_json_template(out_template_json)
    check_template(template, len(out_meta))
    return Compiled(session, input_index, [o.name for o in outputs], template, list(out_meta),
                    source=source, bindable=bindable)


def run_compiled(compiled: Compiled, flat: List[torch.Tensor], device: torch.device,
                 bind_type: Optional[str]) -> List[torch.Tensor]:
    """Run ``compiled`` on the flat inputs; outputs are torch tensors on ``device``."""
    dev = device
    feeds = [(name, flat[i].to(dev).contiguous()) for name, i in compiled.input_index]
    if compiled.bindable and all(t.dtype in _TORCH_TO_NUMPY and t.numel() > 0 for _, t in feeds):
        import numpy as np

        binding = compiled.session.io_binding()
        dev_type, dev_id = bind_type, (dev.index or 0)
        for name, t in feeds:
            binding.bind_input(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[t.dtype]), tuple(t.shape),
                               t.data_ptr())
        outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in compiled.out_meta]
        for name, o in zip(compiled.output_names, outs):
            binding.bind_output(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[o.dtype]), tuple(o.shape),
                                o.data_ptr())
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # ORT uses its own stream; inputs must be ready
        compiled.session.run_with_iobinding(binding)
        return outs
    feed = {}
    for name, t in feeds:
        if t.dtype == torch.bfloat16:
            raise TypeError(f"ONNX input {name} is bfloat16, which this provider path cannot pass through "
                            "numpy; cast to float16 or float32 first")
        feed[name] = t.detach().cpu().numpy()
    results = compiled.session.run(compiled.output_names, feed)
    return [torch.from_numpy(r).to(dev) for r in results]
