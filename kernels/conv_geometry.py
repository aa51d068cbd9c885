"""A convolution's geometry with F.conv2d's semantics (stride, padding including 'same' / 'valid', dilation):
output size and top/left padding, which the masked conv2d kernels and their callers share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

IntPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

__all__ = ["ConvGeometry", "conv_geometry", "IntPair", "Padding"]

def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) == 1:
        return (pair[0], pair[0])
    if len(pair) != 2:
        raise ValueError(f"conv2d {name} must be an int or a pair, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything the kernels need to map output pixels to input taps. `pad` is the top/left padding;
    bottom/right padding (asymmetric for 'same' with an even receptive field) is implied by H_out/W_out and
    the kernels' bounds masks."""

    stride: Tuple[int, int]
    pad: Tuple[int, int]
    dilation: Tuple[int, int]
    kernel: Tuple[int, int]
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]


def conv_geometry(input_hw: Tuple[int, int], kernel_hw: Tuple[int, int], stride: IntPair = 1,
                  padding: Padding = 0, dilation: IntPair = 1) -> ConvGeometry:
    """Output size and top/left padding, with F.conv2d's semantics (including 'same' and 'valid')."""
    stride_p, dil_p = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride_p) < 1 or min(dil_p) < 1:
        raise ValueError(f"conv2d stride and dilation must be positive, got {stride_p} and {dil_p}")
    (h, w), (kh, kw) = input_hw, kernel_hw
    span = (dil_p[0] * (kh - 1), dil_p[1] * (kw - 1))
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if stride_p != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in F.conv2d)")
            # F.conv2d pads the extra element of an odd total at the bottom/right.
            pad = (span[0] // 2, span[1] // 2)
            return ConvGeometry(stride_p, pad, dil_p, (kh, kw), (h, w), (h, w))
        else:
            raise ValueError(f"conv2d padding string must be 'same' or 'valid', got {padding!r}")
    else:
        pad = _pair(padding, "padding")
        if min(pad) < 0:
            raise ValueError(f"conv2d padding must be non-negative, got {pad}")
    h_out = (h + 2 * pad[0] - span[0] - 1) // stride_p[0] + 1
    w_out = (w + 2 * pad[1] - span[1] - 1) // stride_p[1] + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"conv2d output size would be {h_out}x{w_out} for input {h}x{w}, kernel {kh}x{kw}, "
                         f"padding {pad}, dilation {dil_p}: the kernel is larger than the padded input")
    return ConvGeometry(stride_p, pad, dil_p, (kh, kw), (h, w), (h_out, w_out))
