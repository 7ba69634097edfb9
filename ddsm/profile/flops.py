"""FLOP counting that a paper can print: torch's FlopCounterMode plus formulas for the ops it misses.

Convention (also in every report as ``FlopReport.convention``):

- FLOPs = 2 x multiply-adds. Conv, mm, bmm, addmm, baddbmm and attention keep torch's own formulas
  (2 x MACs; bias additions not counted, as in FlopCounterMode and fvcore). ``gmacs`` is FLOPs / 2.
- Bilinear ``grid_sample``: 4 multiply-adds (8 FLOPs) per output element (N, C, Ho, Wo) to blend the
  4 corners, plus 4 FLOPs per output location (N, Ho, Wo) to form the 4 corner weights, which every
  channel shares. Bicubic: 16 multiply-adds per element + 16 per location. Nearest: 0 (a gather).
- Bilinear ``interpolate``: 4 multiply-adds (8 FLOPs) per output element (weights are per row and
  column, not counted); bicubic 16 multiply-adds (32 FLOPs). Nearest: 0 per element (a gather; torch
  decomposes it into source-index arithmetic per output row and column, counted as pointwise ops).
- Softmax and log-softmax: 5 FLOPs per element (max, subtract, exp, sum, divide); exp counts as 1.
- Average pooling: one FLOP per window element (window - 1 adds + 1 divide), with the exact window
  sizes of adaptive pooling. Max pooling: window - 1 comparisons per output element.
- BatchNorm: 2 FLOPs per element (the inference-time per-channel scale and shift). Layer and group
  norm: 5 per element (3 for the statistics, 2 for the scale and shift).
- Pointwise arithmetic, comparisons and activations (add, mul, ge, relu, sigmoid, exp, ...): 1 FLOP
  per output element (addcmul, addcdiv, lerp: 2); reductions (sum, mean, amax, ...): 1 per input
  element; both only when an input is floating-point: integer index arithmetic and boolean logic
  are not floating-point operations and count 0.
- Weighted row gathers (``embedding_bag`` with per-sample weights, DDSM's fast sampling path): one
  multiply-add per gathered value; its gather-dot kernel (``_embedding_bag_per_sample_weights_backward``
  used forward): one multiply-add per value of each C-long dot product.
- FLOP-free by convention (``FREE_OPS``): views and reshapes, copies and dtype casts, cat/stack,
  slicing and indexing gathers, padding, tensor creation (empty, zeros, arange, rand), ``where``.

Every op that ran but is neither counted nor FLOP-free is listed in ``uncounted_ops``, never
silently counted as zero. Counts are forward-only, in eval mode, under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

CONVENTION = (
    "FLOPs = 2 x multiply-adds (conv/matmul as torch FlopCounterMode, bias not counted); "
    "bilinear grid_sample 8/output element + 4/output location, bilinear interpolate 8/output element, "
    "softmax 5/element, avg pool 1/window element, max pool window-1/output, batchnorm 2/element, "
    "layer/group norm 5/element, pointwise ops and activations 1/element, reductions 1/input element "
    "(integer and boolean ops free), weighted embedding_bag gathers 2/gathered value; "
    "views, copies, cat, indexing, padding, creation and nearest resampling are FLOP-free; forward only, eval mode"
)

# Ops whose output is a rearrangement, copy or gather of existing values, or a new constant tensor.
FREE_OPS = frozenset({
    # views and reshapes
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "as_strided", "alias", "detach", "lift_fresh", "unfold",
    "view_as", "_reshape_alias", "split", "split_with_sizes", "unbind", "chunk", "narrow", "slice", "select",
    # copies, casts, concatenation
    "clone", "copy_", "_to_copy", "to", "contiguous", "cat", "stack", "repeat", "roll", "flip",
    "lift_fresh_copy", "_copy_from", "_copy_from_and_resize",
    # gathers and scatters (nearest resampling is a gather)
    "index", "_unsafe_index", "index_select", "embedding", "gather", "index_put", "index_put_", "_index_put_impl_",
    "masked_fill", "masked_fill_", "where",
    "constant_pad_nd", "reflection_pad2d", "replication_pad2d", "pixel_shuffle", "pixel_unshuffle",
    # creation
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
    "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "fill_", "zero_",
    "fill", "scalar_tensor", "eye", "arange", "linspace", "rand", "randn", "randint", "rand_like", "randn_like",
    "normal_", "uniform_", "bernoulli_", "resize_",
    # metadata and host transfers
    "_local_scalar_dense", "item", "size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim",
    "is_contiguous", "sym_is_contiguous", "storage_offset", "sym_storage_offset", "is_same_size",
    "_assert_async", "_assert_tensor_metadata", "set_", "detach_",
})

POINTWISE_OPS = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "reciprocal", "abs",
    "relu", "relu_", "threshold", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "gelu", "silu",
    "silu_", "hardswish", "hardswish_", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_",
    "exp", "log", "sqrt", "rsqrt", "pow", "sin", "cos", "floor", "ceil", "round", "trunc", "frac",
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "maximum", "minimum",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "sign",
)
POINTWISE2_OPS = ("addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_")
REDUCTION_OPS = ("sum", "mean", "amax", "amin", "max", "min", "prod", "argmax", "argmin", "var", "std",
                 "var_mean", "std_mean", "logsumexp", "linalg_vector_norm", "norm", "cumsum")
BATCH_NORM_OPS = ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
                  "cudnn_batch_norm", "miopen_batch_norm", "_native_batch_norm_legit_functional")
MATMUL_OPS = ("convolution", "_convolution", "cudnn_convolution", "_slow_conv2d_forward",
              "convolution_overrideable", "mm", "addmm", "bmm", "baddbmm", "_scaled_mm")


def _numel(shape: Any) -> int:
    return math.prod(shape)


def _out_numel(out_shape: Any) -> int:
    """Element count of an op's (first) output; multi-output ops give a tuple of shapes."""
    if isinstance(out_shape, (tuple, list)) and out_shape and isinstance(out_shape[0], (tuple, list, torch.Size)):
        out_shape = out_shape[0]
    return _numel(out_shape)


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    return (x[0], x[0]) if len(x) == 1 else (x[0], x[1])


def _adaptive_window_sum(n_in: int, n_out: int) -> int:
    """Sum of adaptive-pooling window lengths: window i spans floor(i*In/Out) .. ceil((i+1)*In/Out)."""
    return sum(-(-(i + 1) * n_in // n_out) - (i * n_in // n_out) for i in range(n_out))


# ----------------------------------------------------------------------------- formulas (shape-based)


def grid_sample_flop(x_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
    """grid_sampler_2d: bilinear 8/output element + 4/output location; bicubic 32 + 16; nearest 0."""
    n, c, ho, wo = out_shape
    per_elem, per_loc = {0: (8, 4), 1: (0, 0), 2: (32, 16)}[interpolation_mode]
    return per_elem * n * c * ho * wo + per_loc * n * ho * wo


def upsample_bilinear_flop(*args, out_shape=None, **kwargs) -> int:
    """upsample_bilinear2d: 4 multiply-adds per output element."""
    return 8 * _out_numel(out_shape)


def upsample_bicubic_flop(*args, out_shape=None, **kwargs) -> int:
    """upsample_bicubic2d: 16 multiply-adds per output element."""
    return 32 * _out_numel(out_shape)


def zero_flop(*args, out_shape=None, **kwargs) -> int:
    """Nearest resampling: a gather, 0 FLOPs (for torch versions that dispatch it undecomposed)."""
    return 0


def softmax_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
    """_softmax / _log_softmax: max, subtract, exp, sum, divide = 5 per element."""
    return 5 * _numel(x_shape)


def avg_pool2d_flop(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    """avg_pool2d: kh*kw per output element (kh*kw - 1 adds + 1 divide)."""
    kh, kw = _pair(kernel_size)
    return _out_numel(out_shape) * kh * kw


def adaptive_avg_pool2d_flop(x_shape, output_size, *args, out_shape=None, **kwargs) -> int:
    """_adaptive_avg_pool2d: one FLOP per element of every (possibly overlapping) window."""
    *lead, h, w = x_shape
    oh, ow = out_shape[-2:]
    return _numel(lead) * _adaptive_window_sum(h, oh) * _adaptive_window_sum(w, ow)


def max_pool2d_flop(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    """max_pool2d(_with_indices): kh*kw - 1 comparisons per output element."""
    kh, kw = _pair(kernel_size)
    return _out_numel(out_shape) * (kh * kw - 1)


def adaptive_max_pool2d_flop(x_shape, output_size, *args, out_shape=None, **kwargs) -> int:
    """adaptive_max_pool2d: window - 1 comparisons per output element."""
    *lead, h, w = x_shape
    oh, ow = _out_shape_hw(out_shape)
    return _numel(lead) * _adaptive_window_sum(h, oh) * _adaptive_window_sum(w, ow) - _out_numel(out_shape)


def _out_shape_hw(out_shape: Any) -> tuple[int, int]:
    first = out_shape[0] if isinstance(out_shape[0], (tuple, list, torch.Size)) else out_shape
    return first[-2], first[-1]


def batch_norm_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
    """Batch norm: 2 per element (per-channel scale and shift, as at inference)."""
    return 2 * _numel(x_shape)


def layer_norm_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
    """native_layer_norm / native_group_norm: 3 per element for statistics + 2 for scale and shift."""
    return 5 * _numel(x_shape)


def _on_floats(args: tuple) -> bool:
    """True when any tensor argument holds floating-point data (index math and boolean logic are free)."""
    return any(isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex()) for a in args)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """Mark a formula as taking the tensors themselves (FlopCounterMode's ``_get_raw``), not shapes."""
    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


@_raw
def pointwise_flop(*args, out_val=None, **kwargs) -> int:
    """One FLOP per output element of an op on floating-point tensors; 0 for integer or boolean ops."""
    return _first(out_val).numel() if _on_floats(args) else 0


@_raw
def pointwise2_flop(*args, out_val=None, **kwargs) -> int:
    """Two FLOPs per output element (a multiply and an add) on floating-point tensors."""
    return 2 * _first(out_val).numel() if _on_floats(args) else 0


@_raw
def reduction_flop(x, *args, out_val=None, **kwargs) -> int:
    """One FLOP per input element (or per output element for the elementwise overloads of max/min)."""
    if not _on_floats((x, *args)):
        return 0
    return max(x.numel() if isinstance(x, torch.Tensor) else 1, _first(out_val).numel())


def embedding_bag_flop(weight_shape, indices_shape, offsets_shape, scale_grad_by_freq=False, mode=0, sparse=False,
                       per_sample_weights_shape=None, *args, out_shape=None, **kwargs) -> int:
    """_embedding_bag(_forward_only): per gathered row of C values, a multiply-add (weighted) or an add."""
    per_value = 2 if per_sample_weights_shape is not None else 1
    return per_value * _numel(indices_shape) * weight_shape[-1]


def embedding_bag_dot_flop(grad_shape, weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    """_embedding_bag_per_sample_weights_backward: one C-long dot product (C multiply-adds) per index."""
    return 2 * _numel(indices_shape) * weight_shape[-1]


def sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU scaled-dot-product attention: torch's GPU attention formula (the two matmuls, 2 x MACs)."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _packets(names: tuple[str, ...]) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def extra_formulas() -> dict[Any, Callable[..., int]]:
    """Our formulas keyed by aten op packet, to pass as FlopCounterMode(custom_mapping=...)."""
    table: dict[Any, Callable[..., int]] = {
        aten.grid_sampler_2d: grid_sample_flop,
        aten.upsample_bilinear2d: upsample_bilinear_flop,
        aten.upsample_bicubic2d: upsample_bicubic_flop,
        aten.upsample_nearest1d: zero_flop,
        aten.upsample_nearest2d: zero_flop,
        aten.upsample_nearest3d: zero_flop,
        aten._softmax: softmax_flop,
        aten._log_softmax: softmax_flop,
        aten.avg_pool2d: avg_pool2d_flop,
        aten._adaptive_avg_pool2d: adaptive_avg_pool2d_flop,
        aten.max_pool2d: max_pool2d_flop,
        aten.max_pool2d_with_indices: max_pool2d_flop,
        aten.adaptive_max_pool2d: adaptive_max_pool2d_flop,
        aten.native_layer_norm: layer_norm_flop,
        aten.native_group_norm: layer_norm_flop,
        aten._embedding_bag: embedding_bag_flop,
        aten._embedding_bag_forward_only: embedding_bag_flop,
        aten._embedding_bag_per_sample_weights_backward: embedding_bag_dot_flop,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # CPU attention has no torch formula
        table[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu_flop
    for packets, fn in [(BATCH_NORM_OPS, batch_norm_flop), (POINTWISE_OPS, pointwise_flop),
                        (POINTWISE2_OPS, pointwise2_flop), (REDUCTION_OPS, reduction_flop)]:
        for p in _packets(packets):
            table.setdefault(p, fn)
    return table


# ----------------------------------------------------------------------------- counting


@dataclass
class FlopReport:
    """Forward FLOPs of one call: total, by aten op, by top-level module, and what went uncounted."""

    total_flops: int
    by_op: dict[str, int]
    by_module: dict[str, int]
    uncounted_ops: list[str]
    convention: str = field(default=CONVENTION)

    @property
    def gflops(self) -> float:
        """Total in units of 1e9 FLOPs."""
        return self.total_flops / 1e9

    @property
    def gmacs(self) -> float:
        """Total in units of 1e9 multiply-adds (FLOPs / 2 by the convention)."""
        return self.total_flops / 2e9

    @property
    def matmul_flops(self) -> int:
        """The conv + matmul part (what fvcore counts, times 2)."""
        return sum(v for k, v in self.by_op.items() if k.split(".")[-1] in MATMUL_OPS)


class _OpRecorder(TorchDispatchMode):
    """Records every aten op packet that executes (under FlopCounterMode: after its decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(getattr(func, "_overloadpacket", func))] += 1
        return func(*args, **(kwargs or {}))


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def count_flops(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], *, warmup: bool = True,
                formulas: Mapping[Any, Callable[..., int]] | None = None) -> FlopReport:
    """Forward FLOPs of ``model(*inputs)`` in eval mode (train/eval flags are restored afterwards).

    warmup: run the model once before counting, so lazily built constants (e.g. cached sine position
    tables) are not counted as per-image work.
    formulas: extra or replacement formulas {aten packet: f(*shapes, out_shape=...) -> int}.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    table = {**extra_formulas(), **(formulas or {})}
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            if warmup:
                model(*args)
            recorder = _OpRecorder()
            counter = FlopCounterMode(display=False, custom_mapping=table)
            with recorder, counter:
                model(*args)
    finally:
        _restore_modes(modes)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    by_op = {str(k): int(v) for k, v in counts.get("Global", {}).items()}
    by_module = {name[len(root) + 1:]: int(sum(ops.values())) for name, ops in counts.items()
                 if name.startswith(root + ".") and name.count(".") == 1}
    rest = sum(by_op.values()) - sum(by_module.values())
    if rest > 0:  # ops run directly in the root's forward (e.g. the final upsampling)
        by_module["(top level)"] = int(rest)
    known = {str(k) for k in counter.flop_registry} | {f"aten.{n}" for n in FREE_OPS}
    uncounted = sorted(op for op in recorder.seen if op not in known)
    return FlopReport(total_flops=int(sum(by_op.values())), by_op=by_op, by_module=by_module, uncounted_ops=uncounted)
