"""FLOPs and bytes of one aten op, estimated from shapes (internal to spill.torch).

FLOPs count 2 per multiply-add, as the graph format and spill's model zoo do. Matrix
products and convolutions use their exact formulas; normalisations, softmax and GELU a few
FLOPs per element (the zoo's figures); copies and data movement none; anything else one per
element of its largest tensor.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch

# FLOPs per element of the largest tensor, for ops that do more than one.
_PER_ELEMENT = {
    "native_layer_norm": 8.0, "native_layer_norm_backward": 12.0,
    "native_batch_norm": 8.0, "native_batch_norm_backward": 12.0,
    "_native_batch_norm_legit": 8.0, "_native_batch_norm_legit_functional": 8.0,
    "_native_batch_norm_legit_no_training": 4.0, "native_group_norm": 8.0,
    "native_group_norm_backward": 12.0, "_softmax": 5.0, "_log_softmax": 5.0,
    "_softmax_backward_data": 3.0, "_log_softmax_backward_data": 3.0, "gelu": 8.0,
    "gelu_backward": 8.0, "silu": 4.0, "silu_backward": 6.0, "tanh": 4.0, "sigmoid": 4.0,
    "erf": 4.0, "exp": 2.0, "log": 2.0, "rsqrt": 2.0, "sqrt": 2.0, "pow": 2.0,
    "_fused_rms_norm": 6.0, "addcmul": 2.0, "addcmul_": 2.0, "addcdiv": 2.0, "addcdiv_": 2.0,
}

# Ops that only move or fill data: no arithmetic.
_NO_FLOPS = {
    "clone", "_to_copy", "copy", "copy_", "cat", "stack", "index_select", "gather", "embedding",
    "embedding_dense_backward", "zeros", "ones", "full", "fill", "fill_", "zero_", "zeros_like",
    "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "scalar_tensor", "arange",
    "constant_pad_nd", "index", "index_put", "index_put_", "slice_backward", "select_backward",
    "expand_copy", "permute_copy", "repeat", "masked_fill", "masked_fill_", "where", "scatter",
    "scatter_", "lift_fresh", "lift_fresh_copy", "tensor", "_unsafe_view", "split_with_sizes_copy",
    "detach_copy", "view_copy", "transpose_copy", "narrow_copy", "as_strided_scatter",
    "slice_scatter", "select_scatter", "diagonal_scatter", "rand", "randn", "rand_like",
    "randn_like", "randint", "bernoulli", "bernoulli_", "normal_", "uniform_", "random_",
}

# Scaled-dot-product attention kernels: (forward?, index of query, key, value).
_ATTENTION_FORWARD = {
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
    "_scaled_dot_product_fused_attention_overrideable",
}


def tensors_in(value: Any) -> Iterable[torch.Tensor]:
    """Every tensor in a nest of lists, tuples and mappings (dicts, a tokenizer's
    BatchEncoding: the nests map_tensors rebuilds)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from tensors_in(v)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _conv_flops(x: torch.Tensor, w: torch.Tensor, out_shape: Sequence[int],
                transposed: bool) -> float:
    # Each output element of a convolution is a dot product over weight.shape[1:] (input
    # channels per group times the kernel); a transposed one scatters each input element instead.
    per = _numel(w.shape[1:])
    return 2.0 * per * (_numel(x.shape) if transposed else _numel(out_shape))


def _attention_flops(q: torch.Tensor, k: torch.Tensor) -> float:
    # Q K^T and P V: 2 * 2 * batch * heads * Lq * Lk * head_dim.
    *lead, lq, d = q.shape
    lk = k.shape[-2]
    return 4.0 * _numel(lead) * lq * lk * d


def op_flops(name: str, args: Sequence[Any], kwargs: dict, out: Any) -> float:
    """FLOPs of aten op `name` (the overload packet's name, e.g. "addmm") on these arguments."""
    try:
        if name == "mm":
            a, b = args[0], args[1]
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        if name == "addmm":
            a, b = args[1], args[2]
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] + a.shape[0] * b.shape[1]
        if name == "bmm":
            a, b = args[0], args[1]
            return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if name == "baddbmm":
            a, b = args[1], args[2]
            return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] + _numel(out.shape)
        if name in ("linear", "matmul") and isinstance(out, torch.Tensor):
            return 2.0 * _numel(out.shape) * args[0].shape[-1]
        if name in ("convolution", "_convolution"):
            transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed"))
            return _conv_flops(args[0], args[1], out.shape, transposed)
        if name == "convolution_backward":
            grad_out, x, w = args[0], args[1], args[2]
            transposed = bool(args[7]) if len(args) > 7 else False
            mask = args[10] if len(args) > 10 else kwargs.get("output_mask", (True, True, True))
            fwd = _conv_flops(x, w, grad_out.shape, transposed)
            return fwd * (int(bool(mask[0])) + int(bool(mask[1]))) + (
                _numel(grad_out.shape) if mask[2] else 0)
        if name in _ATTENTION_FORWARD:
            return _attention_flops(args[0], args[1])
        if name.startswith("_scaled_dot_product") and name.endswith("_backward") or name in (
                "_flash_attention_backward", "_efficient_attention_backward"):
            # Two products for dQ/dK, two for dP/dV, one recomputation of Q K^T.
            return 2.5 * _attention_flops(args[1], args[2])
    except (IndexError, AttributeError, TypeError):
        pass  # an overload with another signature: fall through to the element count
    if name in _NO_FLOPS:
        return 0.0
    largest = max((t.numel() for t in tensors_in((args, kwargs, out))), default=0)
    return _PER_ELEMENT.get(name, 1.0) * float(largest)


def view_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads or writes through this tensor: its elements, at most its storage (a
    broadcast, stride-0 view of a bias or of a scalar gradient reads its few bytes, not its
    view's elements: counted in full, `x * w.expand(...)` counted 1.5 times the bytes it
    touches, audit 45a F13)."""
    elements = t.numel() * t.element_size()
    try:
        storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
        return min(elements, storage.nbytes())
    except (RuntimeError, NotImplementedError):  # (a tensor without storage: its elements)
        return elements
