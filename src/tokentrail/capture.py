"""Reading a model's residual stream as it passes: the one set of hooks that tracing and steering share.

`layer_hooks(parts, on_layer)` registers, for one `with` block, a pre-hook on the module where layer 0 is read
(the input of the first block) and a forward hook on every distinct block module, and calls
`on_layer(slot, hidden)` with what passes: slot 0 with the first input of `parts.entry` (a shared first block
may run again later; its later inputs are not layer 0), slot l with the output of the l-th block call. A block
that runs several times in one forward pass (shared or looped layers, unrolled by the self-check) fills one
slot per call in the order the self-check saw; a call beyond those goes to its last slot again, so a caller
counting calls per slot sees the excess and can refuse it. The hooks never modify the model or what flows
through it, and are removed on leaving the block, also on error (nnsight's rule: the user's model is theirs).

`first_tensor` unwraps what a block or norm returns (a tensor, a tuple or a ModelOutput) to its hidden state.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only
    from tokentrail.models.parts import ModelParts


def first_tensor(output: Any) -> Any:
    """The hidden state in what a block or norm returns: a tensor, or the first item of a tuple or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if hasattr(output, "to_tuple"):
        items = output.to_tuple()
        return items[0] if items else None
    return output


def forward_parameters(module: torch.nn.Module) -> list[str]:
    """The names a module's forward accepts, in order; empty when its signature cannot be read."""
    try:
        return [name for name in inspect.signature(module.forward).parameters if name != "self"]
    except (TypeError, ValueError):
        return []


def first_parameter(module: torch.nn.Module) -> str:
    """Name of a block's first forward argument, where its hidden state arrives when passed by keyword."""
    names = forward_parameters(module)
    return names[0] if names else "hidden_states"


def slot_name(slot: int) -> str:
    return "the input of block 1" if slot == 0 else f"block {slot}"


class LayerHooks:
    """What `layer_hooks` yields: `new_pass()` restarts the count of block calls before a forward pass."""

    def __init__(self, parts: ModelParts, on_layer: Callable[[int, Any], None]) -> None:
        self.parts = parts
        self.on_layer = on_layer
        self.first_argument = first_parameter(parts.entry)
        self.slots_of: dict[torch.nn.Module, list[int]] = {}
        for slot, block in enumerate(parts.blocks, start=1):
            self.slots_of.setdefault(block, []).append(slot)
        # A first block that runs again later in the pass (shared blocks): only its first input is layer 0, and
        # the caller marks where a pass begins. Otherwise every call of the entry begins one.
        self.entry_repeats = len(self.slots_of.get(parts.entry, [])) > 1
        self.seen: dict[torch.nn.Module, int] = {}
        self.entry_done = False

    def new_pass(self) -> None:
        self.seen.clear()
        self.entry_done = False

    def before_entry(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.entry_repeats and self.entry_done:
            return
        if not self.entry_repeats:
            self.seen.clear()
        self.entry_done = True
        self.on_layer(0, args[0] if args else kwargs.get(self.first_argument))

    def after(self, slots: list[int]) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            calls = self.seen.get(module, 0)
            self.seen[module] = calls + 1
            self.on_layer(slots[min(calls, len(slots) - 1)], first_tensor(output))

        return hook


@contextlib.contextmanager
def layer_hooks(parts: ModelParts, on_layer: Callable[[int, Any], None]) -> Iterator[LayerHooks]:
    """Call `on_layer(slot, hidden)` for layer 0 and every block call while the block is open (see above).

    `hidden` is the unwrapped tensor as the module passes it, in the model's own layout; `parts.batch_first`
    turns it into `[batch, tokens, ...]`. Call `new_pass()` on the yielded object before each forward pass
    of a model with shared blocks (the tracer does before every batch).
    """
    hooks = LayerHooks(parts, on_layer)
    handles = [parts.entry.register_forward_pre_hook(hooks.before_entry, with_kwargs=True)]
    try:
        for block, slots in hooks.slots_of.items():
            handles.append(block.register_forward_hook(hooks.after(slots)))
        yield hooks
    finally:
        for handle in handles:
            handle.remove()
