"""Hooking modules while a delta is applied: hooks that always come off again, and the
hidden states a layer gets (by position or by keyword, depending on the transformers
version)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[torch.nn.Module, Callable]], pre: bool = False):
    """Registers each (module, hook) as a forward hook (with `pre`, as a forward pre-hook
    that also gets the keyword arguments) while entered; always removes them."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if pre
                           else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer's forward pre-hook sees."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The layer's arguments with `hidden` in place of its hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
