"""Live-tensor accounting for ``ossrl memory``: the peak bytes of one device's tensors while a block of code runs.

A ``TorchDispatchMode`` sees every op's outputs (forward and backward: the autograd engine carries the mode to its
threads); each new storage on the tracked device is counted until Python's weak reference to it says it is gone.
It works the same on real tensors and on ``FakeTensorMode``'s shape-only ones (enter the fake mode first). Tensors
that exist before the block (weights, optimizer states, a KV cache) are counted from the start with ``register``.
It counts the bytes tensors ask for: the CUDA caching allocator's rounding (512 bytes) and fragmentation are not
modelled (``ossrl.memory.planner.GPU_OVERHEAD_GIB`` leaves room for them).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class DeviceTracker(TorchDispatchMode):
    """Peak bytes of live tensors on ``device`` inside ``with tracker:``.

    tracker = DeviceTracker(torch.device("meta"))
    tracker.register(model.parameters())
    with tracker:
        loss = model(x).sum(); loss.backward()
    tracker.peak, tracker.current
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    def register(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors that already exist (each storage once)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()

        def gone(_ref: weakref.ref, key: int = key) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]

        self._live[key] = (nbytes, weakref.ref(storage, gone))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
