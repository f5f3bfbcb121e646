"""A backbone server inside the client's process, on a free loopback port."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence


@contextmanager
def embedded_server(model: str, device: str = "auto", dtype: str = "auto",
                    max_batch_tokens: int = 0, prefix_reuse: bool = True,
                    allow_gradients: bool = False, device_map: str | None = None,
                    subspaces: Sequence[str] = ()) -> Iterator[str]:
    """Yields the address of a running server with `model` loaded (and the learned
    subspaces NAME=FILE hosted); stops it on exit."""
    try:
        from backbone_server.server import create_server
        from backbone_server.subspace import parse_hosted
    except ImportError as error:
        raise RuntimeError(
            f"the embedded server needs the server extra ({error.name} is missing): "
            "pip install 'blackbox-tuner[server]', or point --server at a running backbone"
        ) from None
    from backbone_server.errors import ServiceError

    try:
        hosted = parse_hosted(list(subspaces))
    except ServiceError as error:
        raise ValueError(str(error)) from None
    running = create_server(model, "127.0.0.1:0", device=device, dtype=dtype,
                            max_batch_tokens=max_batch_tokens, prefix_reuse=prefix_reuse,
                            allow_gradients=allow_gradients, device_map=device_map, subspaces=hosted)
    try:
        try:
            running.wait_ready()
        except Exception as error:
            raise RuntimeError(f"the embedded server could not load {model!r}: {error}") from None
        yield running.address
    finally:
        running.stop(grace=0)
