"""Memory options, applied to a model from outside (as parallelisms are): ``apply_memory_options``.

- Activation offload (``ActivationOffload``): under gradient checkpointing the only tensor a checkpointed decoder
  layer saves for its backward is its input [T, H]. ``ActivationOffload.hooks()`` (``saved_tensors_hooks``) copies
  each one to pinned host memory on a side CUDA stream (overlapping the next layers' compute) and, in the backward,
  copies it back; fetching layer i's input starts the copy of layer i-1's, so that one overlaps layer i's recompute
  and backward. GPU memory then holds no layer inputs between the forward and the backward (one or two in flight).
- Embedding offload (``offload_embeddings``): the (frozen) embedding table stays on the CPU; a forward gathers the
  batch's rows there and copies only those to the device (``gather_rows``). The parameter keeps its name.
- Chunked MoE (``Experts.chunk_tokens``): each MoE layer runs its tokens that many at a time (``moe_experts``).

On CPU the offloads have nothing to move: the same hooks and gathers run, with no copy.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch
from torch import nn

_HOST = torch.device("cpu")


class MemorySettings(Protocol):
    """What ``apply_memory_options`` reads (``ossrl.config.ModelSettings`` has these fields)."""

    offload_activations: bool
    offload_embeddings: bool
    moe_chunk_tokens: int | None


class _Saved:
    """One offloaded tensor: its host copy, where it came from, and an in-flight copy back (device tensor, event)."""

    __slots__ = ("host", "device", "previous", "pending")

    def __init__(self, host: torch.Tensor, device: torch.device, previous: _Saved | None) -> None:
        self.host, self.device, self.previous = host, device, previous
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None


class ActivationOffload:
    """Saved-tensor hooks that keep saved tensors on the host between the forward and the backward.

    ``stats`` counts what went through: ``saved`` / ``saved_bytes`` (pack), ``restored`` (unpack) and
    ``prefetched`` (restored from a copy started while the layer after it ran its backward)."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks for one forward: enter around the checkpointed layers, in order (the backward then runs them in
        reverse, which is what the prefetch assumes; any other order is still correct, only not prefetched)."""
        last: list[_Saved | None] = [None]

        def pack(tensor: torch.Tensor) -> _Saved | torch.Tensor:
            if tensor.numel() == 0:  # checkpoint's own empty placeholders
                return tensor
            saved = _Saved(self._to_host(tensor), tensor.device, last[0])
            last[0] = saved
            self.stats["saved"] += 1
            self.stats["saved_bytes"] += tensor.numel() * tensor.element_size()
            return saved

        def unpack(saved: _Saved | torch.Tensor) -> torch.Tensor:
            if isinstance(saved, torch.Tensor):
                return saved
            tensor = self._to_device(saved)
            self.stats["restored"] += 1
            previous = saved.previous
            if previous is not None and previous.pending is None and previous.device.type == "cuda":
                previous.pending = self._start_copy_back(previous)
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device == _HOST:
            return tensor  # nothing to offload: the same tensor, no copy
        if not tensor.is_cuda:
            return tensor.to(_HOST)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the copy reads what the forward wrote
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        return host

    def _start_copy_back(self, saved: _Saved) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start the host -> device copy on the side stream (which also ran the device -> host copy, so it reads a
        complete host tensor)."""
        device = saved.device
        tensor = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=device)
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the new block's earlier users are done with it
        with torch.cuda.stream(stream):
            tensor.copy_(saved.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        tensor.record_stream(stream)  # dropped unused (an aborted backward) is still safe
        return tensor, event

    def _to_device(self, saved: _Saved) -> torch.Tensor:
        if saved.host.device == saved.device:
            return saved.host
        if saved.device.type != "cuda":
            return saved.host.to(saved.device)
        if saved.pending is not None:
            tensor, event = saved.pending
            saved.pending = None  # a second backward (retain_graph) copies again
            self.stats["prefetched"] += 1
        else:
            tensor, event = self._start_copy_back(saved)
        torch.cuda.current_stream(saved.device).wait_event(event)
        return tensor


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` on the ids' device, for a table that may be elsewhere: rows gathered where the table is (into
    pinned memory when the ids are on a GPU) and only they are copied to the ids' device. Reads the ids on the host (one
    sync per forward), so a CUDA graph cannot capture it."""
    if weight.device == ids.device:
        return nn.functional.embedding(ids, weight)
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the embedding table is offloaded to the CPU (model.offload_embeddings): its rows are gathered on the "
            "host, which a CUDA graph cannot capture; turn off rollout.cuda_graphs"
        )
    host_ids = ids.to(weight.device)
    if not ids.is_cuda or weight.device != _HOST:
        return nn.functional.embedding(host_ids, weight).to(ids.device)
    rows = torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype, pin_memory=True)
    torch.index_select(weight, 0, host_ids.reshape(-1), out=rows.view(-1, weight.shape[1]))
    return rows.to(ids.device, non_blocking=True)  # the host allocator keeps ``rows`` until the copy is done


def offload_embeddings(model: nn.Module) -> None:
    """Move the model's embedding table (``model.model.embed_tokens.weight``) to the CPU, frozen. The module's
    forward then gathers rows there (``gather_rows``); the parameter keeps its name, so state dicts and checkpoints
    are unchanged. A meta (shape-only) table becomes an uninitialised one on the host; a fake one (``FakeTensorMode``,
    ``ossrl memory``) a fake one there."""
    embed = model.model.embed_tokens
    weight = embed.weight.detach()
    host = torch.empty_like(weight, device=_HOST) if weight.is_meta else weight.to(_HOST)
    embed.weight = nn.Parameter(host, requires_grad=False)  # (a new parameter: ``.data =`` cannot leave meta)
    embed.offloaded = True


def apply_memory_options(model: nn.Module, settings: MemorySettings) -> None:
    """Apply the memory options of ``settings`` (``ModelSettings``) to a ``GptOss``: activation offload (checkpointed
    layers' inputs to host memory; needs ``model.gradient_checkpointing``), the embedding table on the CPU, and the
    MoE's token chunk. Off options are reset, so calling it again with other settings is safe (except that the table,
    once offloaded, stays on the CPU)."""
    if settings.offload_activations and not model.gradient_checkpointing:
        raise ValueError("model.offload_activations needs model.gradient_checkpointing: only a checkpointed layer's "
                         "inputs are saved, and those are what is offloaded")  # fmt: skip
    model.activation_offload = ActivationOffload() if settings.offload_activations else None
    if settings.offload_embeddings:
        offload_embeddings(model)
    for layer in model.model.layers:
        layer.mlp.experts.chunk_tokens = settings.moe_chunk_tokens
