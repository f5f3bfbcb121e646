"""Arrays on the wire: raw little-endian float32 bytes plus a shape (no torch needed),
and the gRPC channel options both sides use."""

from __future__ import annotations

import numpy as np

from blackbox.v1 import backbone_pb2 as pb

WIRE_DTYPE = np.dtype("<f4")
# Test splits of tens of thousands of texts travel in one CreateSession; the 4 MiB
# default would refuse them.
MAX_MESSAGE_BYTES = 256 * 2**20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class WireError(ValueError):
    """A tensor message that does not describe a valid float32 array."""


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype="float32")


def tensor_to_array(tensor: pb.Tensor, ndim: int | None = None) -> np.ndarray:
    if tensor.dtype not in ("", "float32"):
        raise WireError(f"tensor dtype {tensor.dtype!r} is not supported; send float32")
    shape = tuple(tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"expected a {ndim}-d tensor, got shape {shape}")
    if any(size < 0 for size in shape):
        raise WireError(f"negative size in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * WIRE_DTYPE.itemsize
    if len(tensor.data) != expected:
        raise WireError(f"tensor of shape {shape} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(shape)
