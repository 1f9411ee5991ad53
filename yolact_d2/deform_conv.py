"""Modulated deformable convolution (DCNv2) with a fast CPU path.

YOLACT++'s backbone blocks use the modulated deformable convolution of Zhu et al., "Deformable
ConvNets v2: More Deformable, Better Results" (CVPR 2019): each of the kh x kw kernel taps of every
output position reads the input at its regular grid point plus a learnt (dy, dx) offset, by
bilinear interpolation, and the sample is multiplied by a learnt modulation scalar before the usual
weighted sum over taps and input channels.

:func:`deform_conv2d` has the signature and the semantics of ``torchvision.ops.deform_conv2d``
(one weight group, one offset group) and picks an implementation by the input's device:

* **CPU** (``impl="auto"``): :func:`deformable_columns` builds the im2col matrix of the deformed
  samples with one ``torch.nn.functional.embedding_bag`` call (threaded, vectorised), and one GEMM
  with the re-laid-out weight gives the output. torchvision's CPU kernel samples in a serial
  single-threaded loop and copies channels-last input to NCHW; on this project's CPU it took 946 ms
  for YOLACT++ R-50's 13 deformable blocks at 550 px where plain 3x3 convs of the same shapes take
  292 ms (docs/benchmarks.md has the figures of this implementation).
* **CUDA**, any other device, ``impl="torchvision"``, and under tracing / ONNX export /
  ``torch.compile``: ``torchvision.ops.deform_conv2d`` unchanged, so exported graphs still hold
  ``torchvision::deform_conv2d`` (ONNX ``DeformConv`` through :mod:`yolact_d2.export`'s symbolic).

The CPU path reproduces torchvision's numbers (to float rounding) including its edge rules: the
sampling point of tap (i, j) at output (ho, wo) is ``y = ho * stride_h - pad_h + i * dil_h + dy``,
``x = wo * stride_w - pad_w + j * dil_w + dx``; its four bilinear corners that fall outside the
input count as zeros (zero padding), so a point more than one pixel outside samples 0. Gradients
with respect to the input, offsets, mask, weight and bias flow through autograd (``embedding_bag``
is differentiable in its table and in ``per_sample_weights``) and equal torchvision's backward.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision

__all__ = ["DEFORM_CONV_IMPLS", "deform_conv2d", "deformable_columns", "uses_cpu_path", "ColumnWeightCache"]

# Values of MODEL.YOLACT.DEFORM_CONV_IMPL (yolact_d2/config.py).
DEFORM_CONV_IMPLS = ("auto", "torchvision")
# Above this many im2col elements (128 MB in float32) the images of a batch are sampled in chunks.
_MAX_COLUMN_ELEMENTS = 1 << 25

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _exporting_or_compiling() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def uses_cpu_path(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> bool:
    """True when :func:`deform_conv2d` runs the embedding-bag CPU path for these arguments: ``impl``
    "auto", a CPU input, one weight group and one offset group, and no tracing / ONNX export /
    ``torch.compile`` in progress (those keep torchvision's op, which the exporters know)."""
    if impl not in DEFORM_CONV_IMPLS:
        raise ValueError(f"deformable conv implementation must be one of {DEFORM_CONV_IMPLS}, got {impl!r}")
    if impl != "auto" or input.device.type != "cpu" or _exporting_or_compiling():
        return False
    kh, kw = weight.shape[-2:]
    return weight.shape[1] == input.shape[1] and offset.shape[1] == 2 * kh * kw


# Elements below which one ATen elementwise op runs on the calling thread alone (at::internal::GRAIN_SIZE).
_GRAIN_SIZE = 32768
_GRIDS: dict = {}  # regular sampling grids by shape and conv arithmetic (small tensors)


def _grid(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, dtype, device) -> torch.Tensor:
    """(Hout * Wout, kh * kw, 2): the (y, x) input position of every output position and tap
    without offset, ``(ho * stride - pad + i * dil, wo * stride - pad + j * dil)``."""
    key = (ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, dtype, device)
    grid = _GRIDS.get(key)
    if grid is None:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable with autograd later
            tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
            tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
            grid_y = (torch.arange(ho, device=device, dtype=dtype) * sh - ph).view(ho, 1, 1) + tap_y
            grid_x = (torch.arange(wo, device=device, dtype=dtype) * sw - pw).view(1, wo, 1) + tap_x
            grid = torch.stack(torch.broadcast_tensors(grid_y, grid_x), dim=-1).reshape(ho * wo, kh * kw, 2)
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def _bag_offsets(bags: int, device) -> torch.Tensor:
    """0, 4, 8, ...: the start of every 4-corner bag (cached: a threaded arange otherwise)."""
    key = ("offsets", bags, device)
    offsets = _GRIDS.get(key)
    if offsets is None:
        with torch.inference_mode(False), torch.no_grad():
            offsets = torch.arange(0, 4 * bags, 4, device=device)
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = offsets
    return offsets


def _bags(points: torch.Tensor, mask: Optional[torch.Tensor], h: int, w: int, row_base) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear bags of sampling points: (..., 2) (y, x) points and (...) modulation (or None) ->
    (..., 4) int64 rows of the (N * H * W, C) table and (..., 4) weights, corners in the order
    (y0, x0), (y0, x1), (y1, x0), (y1, x1). A corner outside the H x W map gets weight 0 and a
    clamped (valid) row. ``row_base``: n * H * W, an int or a tensor broadcastable to (..., 1)."""
    # floor_divide, not floor: ATen threads its unary math kernels from 2048 elements (a wait for
    # the second thread at every call under load); binary kernels run serially below the grain size.
    floor = torch.floor_divide(points.detach(), 1)
    frac = points - floor  # differentiable: d frac / d point = 1
    # Far-away points: clamped before the integer cast (both of their corners are outside anyway).
    low = floor.clamp_(-2, max(h, w) + 1).to(torch.int64)
    high = low + 1
    zero = torch.zeros(2, dtype=torch.int64, device=points.device)
    last = torch.tensor([h - 1, w - 1], dtype=torch.int64, device=points.device)
    low_c, high_c = low.clamp(min=zero, max=last), high.clamp(min=zero, max=last)
    axis_w = torch.stack(((1 - frac) * (low_c == low), frac * (high_c == high)), dim=-1)  # (..., 2 axes, 2 corners)
    wy, wx = axis_w[..., 0, :], axis_w[..., 1, :]
    if mask is not None:
        wy = wy * mask.unsqueeze(-1)
    weights = (wy.unsqueeze(-1) * wx.unsqueeze(-2)).flatten(-2)
    rows = torch.stack((low_c[..., 0], high_c[..., 0]), dim=-1) * w + row_base
    index = (rows.unsqueeze(-1) + torch.stack((low_c[..., 1], high_c[..., 1]), dim=-1).unsqueeze(-2)).flatten(-2)
    return index, weights


def deformable_columns(
    input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], kernel_size: IntPair,
    stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
) -> torch.Tensor:
    """The im2col matrix of a (modulated) deformable convolution, built by ``embedding_bag``.

    The input is viewed as a table of N*H*W rows of C channels (a free view of a channels-last
    tensor); every (output position, kernel tap) sample is a bag of its 4 bilinear corners weighted
    by bilinear weight x modulation, so one ``embedding_bag(mode="sum", per_sample_weights=...)``
    gives all samples. Corners outside the input get weight 0 (their index is clamped to a valid
    row), which is torchvision's zero padding.

    Without autograd the bags are computed in chunks small enough for every elementwise op to run
    on the calling thread (ATen's grain size): two threads on a loaded machine otherwise wait for
    each other at each of ~20 ops per layer (measured: slower than torchvision at 2 threads, load
    3.5). Only ``embedding_bag`` and the GEMM are threaded.

    Args:
        input: (N, C, H, W) float, any memory format (channels-last avoids a copy).
        offset: (N, 2 * kh * kw, Hout, Wout), (dy, dx) in input pixels per tap, taps in row-major
            order (torchvision's layout); any real values, points outside the input sample zeros.
        mask: (N, kh * kw, Hout, Wout) modulation (DCNv2; usually a sigmoid, in (0, 1)), or None
            (DCNv1, all ones).
        kernel_size, stride, padding, dilation: ints or (h, w) pairs, as for a conv.
    Returns:
        (N * Hout * Wout, kh * kw * C) in the input's dtype, rows in (n, ho, wo) order, columns
        tap-major: column ``k * C + c`` is channel c sampled at tap k.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    n, c, h, w = input.shape
    ho, wo = offset.shape[-2:]
    taps, positions = kh * kw, ho * wo
    table = input.permute(0, 2, 3, 1).reshape(n * h * w, c)
    # Positions and weights in float32 at least (bfloat16 / half hold integers exactly only to 256 / 2048).
    dtype = torch.float64 if offset.dtype == torch.float64 else torch.float32
    grid = _grid(ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, dtype, offset.device)
    offsets = offset.permute(0, 2, 3, 1).reshape(n, positions, taps, 2).to(dtype)
    masks = None if mask is None else mask.permute(0, 2, 3, 1).reshape(n, positions, taps).to(dtype)
    needs_graph = torch.is_grad_enabled() and (offset.requires_grad or (mask is not None and mask.requires_grad))
    if needs_graph:
        row_base = (torch.arange(n, device=input.device) * (h * w)).view(n, 1, 1, 1)
        index, weights = _bags(grid + offsets, masks, h, w, row_base)
        index, weights = index.view(-1, 4), weights.view(-1, 4)
    else:
        index = torch.empty(n * positions * taps, 4, dtype=torch.int64, device=input.device)
        weights = torch.empty(n * positions * taps, 4, dtype=dtype, device=input.device)
        step = max(1, _GRAIN_SIZE // (4 * taps))  # positions per chunk
        for i in range(n):
            for s in range(0, positions, step):
                e = min(positions, s + step)
                idx, wts = _bags(grid[s:e] + offsets[i, s:e], None if masks is None else masks[i, s:e], h, w, i * h * w)
                rows = slice((i * positions + s) * taps, (i * positions + e) * taps)
                index[rows] = idx.view(-1, 4)
                weights[rows] = wts.view(-1, 4)
    columns = F.embedding_bag(index.view(-1), table, _bag_offsets(index.shape[0], input.device), mode="sum",
                              per_sample_weights=weights.view(-1).to(table.dtype))
    return columns.view(n * positions, taps * c)


def _column_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, C, kh, kw) -> (Cout, kh * kw * C), the column order of :func:`deformable_columns`."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


# The no-grad GEMM goes through oneDNN's inner product (torch.ops.mkldnn._linear_pointwise) rather
# than F.linear (MKL): 1.1-1.3x faster per deformable layer on this project's AMD EPYC
# (tools/deform_conv_benchmark.py times both, the second with deform_conv2d(..., onednn_gemm=False)).
def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class ColumnWeightCache:
    """The re-laid-out weight (Cout, kh * kw * C) of one conv, kept between inference calls.

    Valid while the weight is the same tensor, unchanged: the key is its data pointer, its version
    counter (bumped by every in-place change: an optimizer step, ``load_state_dict``, ``copy_``),
    shape, dtype and device. Only used when the call needs no gradient for the weight.
    """

    def __init__(self):
        self.entry = None  # (key, value), replaced as one object (threads may share a model)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        try:
            key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return _column_weight(weight.detach())
        entry = self.entry
        if entry is None or entry[0] != key:
            # A normal tensor even inside inference_mode, so that a later call with autograd on
            # (e.g. a frozen weight in training) may save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                entry = (key, _column_weight(weight.detach()))
            self.entry = entry
        return entry[1]


def _cpu_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, weight_cache, onednn_gemm=True):
    n = input.shape[0]
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    grad = torch.is_grad_enabled()
    weight_grad = grad and weight.requires_grad
    w2 = weight_cache.get(weight) if weight_cache is not None and not weight_grad else _column_weight(weight)
    needs_graph = grad and any(t is not None and t.requires_grad for t in (input, offset, mask, weight, bias))
    onednn = onednn_gemm and not needs_graph and input.dtype == torch.float32 and _onednn_linear_available()
    per_image = ho * wo * kh * kw * input.shape[1]
    chunk = max(1, min(n, _MAX_COLUMN_ELEMENTS // max(per_image, 1)))
    outs = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        cols = deformable_columns(input[s:e], offset[s:e], None if mask is None else mask[s:e],
                                  (kh, kw), stride, padding, dilation)
        if onednn:  # oneDNN's inner product: faster than MKL's GEMM here
            outs.append(torch.ops.mkldnn._linear_pointwise(cols, w2, bias, "none", [], ""))
        else:
            outs.append(F.linear(cols, w2, bias))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.view(n, ho, wo, cout).permute(0, 3, 1, 2)  # channels-last strides
    return out if input.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def deform_conv2d(
    input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, mask: Optional[torch.Tensor] = None,
    impl: str = "auto", weight_cache: Optional[ColumnWeightCache] = None, onednn_gemm: bool = True,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` with the fast CPU path of this module (see its docstring).

    Args:
        input: (N, C, H, W) float.
        offset: (N, 2 * kh * kw, Hout, Wout) (dy, dx) per tap, in input pixels.
        weight: (Cout, C, kh, kw) (one group on the CPU path; torchvision handles groups).
        bias: (Cout,) or None.
        stride, padding, dilation: ints or (h, w) pairs.
        mask: (N, kh * kw, Hout, Wout) modulation in (0, 1) for DCNv2, None for DCNv1.
        impl: "auto" (the CPU path for CPU tensors, torchvision's op elsewhere) or "torchvision".
        weight_cache: a :class:`ColumnWeightCache` owned by the calling layer (inference only).
        onednn_gemm: on the CPU path without autograd, float32, the GEMM through oneDNN (default,
            faster here) or, False, ``F.linear`` (MKL); the outputs agree to float rounding.
    Returns:
        (N, Cout, Hout, Wout); on the CPU path channels-last when the input is channels-last.
    """
    if uses_cpu_path(input, offset, weight, impl):
        return _cpu_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, weight_cache,
                                  onednn_gemm)
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride=_pair(stride), padding=_pair(padding),
                                         dilation=_pair(dilation), mask=mask)
