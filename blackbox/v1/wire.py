"""Arrays on the wire: raw little-endian float32 bytes plus a shape (no torch needed),
and the largest message either side sends (channel.py builds the options from it)."""

from __future__ import annotations

import math

import numpy as np

from blackbox.v1 import backbone_pb2 as pb

WIRE_DTYPE = np.dtype("<f4")
# Test splits of tens of thousands of texts travel in one CreateSession; the 4 MiB
# default would refuse them.
MAX_MESSAGE_BYTES = 256 * 2**20


# The dimensions a tensor may have (the service sends and takes 1-d and 2-d arrays).
MAX_DIMS = 8


class WireError(ValueError):
    """A tensor message that does not describe a valid float32 array."""


def _shape_text(shape: tuple[int, ...], limit: int = 60, count: bool = True) -> str:
    """A shape as a message may show it: its first sizes, about `limit` characters, and
    (`count`) how many there are when that is not all."""
    text = ", ".join(str(size) for size in shape[:MAX_DIMS])
    shown = len(shape[:MAX_DIMS])
    if len(text) > limit:
        text = text[:limit].rsplit(",", 1)[0]
        shown = text.count(",") + 1
    if shown == len(shape):
        return f"[{text}]"
    return f"[{text}, ...]" + (f" ({len(shape)} sizes)" if count else "")


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype="float32")


def tensor_to_array(tensor: pb.Tensor, ndim: int | None = None) -> np.ndarray:
    """The float32 array a tensor message holds. Its shape is checked against its data
    before numpy sees it, in Python integers (a product of int64 sizes wraps around):
    at most MAX_DIMS sizes, none negative, multiplying to exactly the number of values
    sent; a shape of no values may not exceed what a message could ever hold."""
    if tensor.dtype not in ("", "float32"):
        raise WireError(f"tensor dtype {tensor.dtype[:60]!r} is not supported; send float32")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise WireError(f"tensor shape {_shape_text(shape, count=False)} has {len(shape)} sizes; at most {MAX_DIMS}")
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"expected a {ndim}-d tensor, got shape {_shape_text(shape)}")
    if any(size < 0 for size in shape):
        raise WireError(f"negative size in shape {_shape_text(shape)}")
    values, remainder = divmod(len(tensor.data), WIRE_DTYPE.itemsize)
    count = math.prod(shape)  # Python integers: exact however large
    most = MAX_MESSAGE_BYTES // WIRE_DTYPE.itemsize  # the values any message can hold
    if remainder or count != values:
        if remainder:
            held = f"{len(tensor.data)} bytes, not a whole number of float32 values"
        else:
            held = f"{values} float32 values ({len(tensor.data)} bytes)"
        needs = f"{count} values" if count <= most else f"more than the {most} values any message holds"
        raise WireError(f"tensor of shape {_shape_text(shape)} needs {needs}, got {held}; send a shape whose "
                        "sizes multiply to the number of values sent")
    if count == 0 and math.prod(size for size in shape if size) > most:
        raise WireError(f"tensor of shape {_shape_text(shape)} holds no values, yet its other sizes multiply to "
                        f"more than the {most} values any message holds: no array has that shape")
    return np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(shape)
