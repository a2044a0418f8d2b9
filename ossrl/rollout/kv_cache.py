"""Paged KV cache for the rollout engine.

Keys and values live in fixed-size pages, ``k[layer][page, slot, kv_head, :]``; each sequence has a page table
(logical page i -> physical page) per pool. Full-attention layers use one pool whose pages a sequence keeps for its
whole life. Sliding-window layers use a second, small pool: a query never looks further back than the window, so
pages wholly older than the window go back to the pool while the sequence runs, and a prefill stores only the last
``window`` tokens. Page-table entries of released pages are left pointing at page 0: the attention kernels never
read positions outside the window (the reference reads and masks them).

A ``PagedKVCache`` is a layout (pages per pool) plus, while allocated, its tensors: the engine keeps one across
rollouts, ``free``s the tensors while the trainer needs the memory and ``allocate``s them again (``ptrs`` says where
they landed: a captured decode graph is only valid at the addresses it was captured with).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ossrl.kernels import sink_attention
from ossrl.kernels.decode_ref import paged_decode_attention
from ossrl.model.config import GptOssConfig


def sliding_pages_per_sequence(window: int, page_size: int, max_chunk: int) -> int:
    """Live sliding-window pages of one sequence: the window plus the largest chunk written in one step."""
    return -(-(window + max_chunk) // page_size) + 1


class PagePool:
    """Free list of physical pages plus reservations, so an admitted sequence can never run out mid-way."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, -1, -1))
        self.reserved = 0

    def can_reserve(self, pages: int) -> bool:
        return self.reserved + pages <= self.num_pages

    def reserve(self, pages: int) -> None:
        if not self.can_reserve(pages):
            raise RuntimeError(f"page pool: cannot reserve {pages} pages ({self.reserved}/{self.num_pages} reserved)")
        self.reserved += pages

    def unreserve(self, pages: int) -> None:
        self.reserved -= pages

    def take(self) -> int:
        return self.free.pop()

    def give(self, page: int) -> None:
        self.free.append(page)


@dataclass
class SequencePages:
    """One sequence's pages in both pools and how many tokens the cache holds for it."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)  # -1 where a page was released (older than the window)
    cached_len: int = 0
    full_reserved: int = 0
    sliding_reserved: int = 0
    trimmed: int = 0  # leading sliding pages already given back (trim starts there)


class PagedKVCache:
    def __init__(
        self,
        config: GptOssConfig,
        *,
        full_pages: int,
        sliding_pages: int,
        page_size: int,
        device: torch.device,
        dtype: torch.dtype,
        allocate: bool = True,
    ) -> None:
        self.page_size = page_size
        self.window = config.sliding_window
        self.sliding = [t == "sliding_attention" for t in config.layer_types]
        self.page_shape = (page_size, config.num_key_value_heads, config.head_dim)
        self.num_pages = {False: full_pages, True: sliding_pages}
        self.scratch = {False: full_pages, True: sliding_pages}  # the scratch page's index, per pool (sliding?)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ptrs: tuple[int, ...] = ()  # addresses of the k/v tensors (a captured graph is only valid at these)
        self.reset()
        if allocate:
            self.allocate()

    # ---- memory ------------------------------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return bool(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of the k/v tensors (allocated or not): this layout's memory."""
        per_page = 2 * torch.finfo(self.dtype).bits // 8 * self.page_shape[0] * self.page_shape[1] * self.page_shape[2]
        return per_page * sum(self.num_pages[s] + 1 for s in self.sliding)

    def allocate(self) -> None:
        """Allocate the k/v tensors (zeros), one page past each pool: the scratch page, which padding rows of a
        fixed-size decode step write and read."""
        if self.allocated:
            return
        for sliding in self.sliding:
            shape = (self.num_pages[sliding] + 1, *self.page_shape)
            self.k.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
        self.ptrs = tuple(t.data_ptr() for t in self.k + self.v)

    def free(self) -> None:
        """Drop the k/v tensors (the layout and the page pools stay; ``allocate`` brings the memory back)."""
        self.k, self.v, self.ptrs = [], [], ()

    def reset(self) -> None:
        """Empty page pools: every page free, nothing reserved (the start of a rollout)."""
        self.full_pool = PagePool(self.num_pages[False])
        self.sliding_pool = PagePool(self.num_pages[True] if any(self.sliding) else 0)

    # ---- pages -------------------------------------------------------------------------------------------------
    @staticmethod
    def pages_for(tokens: int, page_size: int) -> int:
        return -(-tokens // page_size)

    def sliding_pages_needed(self, max_chunk: int) -> int:
        return sliding_pages_per_sequence(self.window, self.page_size, max_chunk) if any(self.sliding) else 0

    # ---- lifetime ----------------------------------------------------------------------------------------------
    def admit(self, max_len: int, max_chunk: int) -> SequencePages | None:
        """Reserve what a sequence of up to ``max_len`` tokens needs; None when it does not fit right now."""
        full = self.pages_for(max_len, self.page_size) if not all(self.sliding) else 0
        sliding = self.sliding_pages_needed(max_chunk)
        if not (self.full_pool.can_reserve(full) and self.sliding_pool.can_reserve(sliding)):
            return None
        self.full_pool.reserve(full)
        self.sliding_pool.reserve(sliding)
        return SequencePages(full_reserved=full, sliding_reserved=sliding)

    def fits_ever(self, max_len: int, max_chunk: int, copies: int = 1) -> bool:
        """Whether ``copies`` such sequences fit an empty cache (a request's n samples are admitted together)."""
        full = self.pages_for(max_len, self.page_size) if not all(self.sliding) else 0
        sliding = self.sliding_pages_needed(max_chunk)
        return copies * full <= self.full_pool.num_pages and copies * sliding <= self.sliding_pool.num_pages

    def release(self, seq: SequencePages) -> None:
        for page in seq.full:
            self.full_pool.give(page)
        for page in seq.sliding:
            if page >= 0:
                self.sliding_pool.give(page)
        self.full_pool.unreserve(seq.full_reserved)
        self.sliding_pool.unreserve(seq.sliding_reserved)
        seq.full, seq.sliding, seq.full_reserved, seq.sliding_reserved, seq.trimmed = [], [], 0, 0, 0

    def grow(self, seq: SequencePages, new_len: int, first_stored: int) -> None:
        """Make pages exist for positions < new_len (full pool) and for positions first_stored .. new_len - 1
        (sliding pool: older positions are never stored)."""
        need = self.pages_for(new_len, self.page_size)
        if not all(self.sliding):
            while len(seq.full) < need:
                seq.full.append(self.full_pool.take())
        if any(self.sliding):
            seq.sliding.extend([-1] * (need - len(seq.sliding)))
            for i in range(first_stored // self.page_size, need):
                if seq.sliding[i] < 0:
                    seq.sliding[i] = self.sliding_pool.take()

    def trim(self, seq: SequencePages) -> None:
        """Give back sliding pages no future query can see (all their positions older than the window)."""
        if not any(self.sliding):
            return
        oldest_visible = seq.cached_len - self.window + 1  # the next query sits at cached_len
        end = max(0, oldest_visible) // self.page_size
        for i in range(seq.trimmed, end):
            if seq.sliding[i] >= 0:
                self.sliding_pool.give(seq.sliding[i])
                seq.sliding[i] = -1
        seq.trimmed = max(seq.trimmed, end)

    def copy_pages(self, src: SequencePages, dst: SequencePages) -> None:
        """Give ``dst`` its own copy of everything ``src`` has cached (n samples sharing one prefill)."""
        dst.full = [self.full_pool.take() for _ in src.full]
        dst.sliding = [self.sliding_pool.take() if p >= 0 else -1 for p in src.sliding]
        pairs = {
            False: (src.full, dst.full),
            True: ([p for p in src.sliding if p >= 0], [p for p in dst.sliding if p >= 0]),
        }
        for layer, sliding in enumerate(self.sliding):
            s, d = pairs[sliding]
            if s:
                s_idx = torch.tensor(s, device=self.device)
                d_idx = torch.tensor(d, device=self.device)
                self.k[layer][d_idx] = self.k[layer][s_idx]
                self.v[layer][d_idx] = self.v[layer][s_idx]
        dst.cached_len, dst.trimmed = src.cached_len, src.trimmed


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``; on CUDA through pinned memory, so the copy does not wait for the GPU.
    Made outside inference mode: ``sink_attention`` keys its once-per-pack check on the version counter of
    ``cu_seqlens``, which inference tensors do not have."""
    with torch.inference_mode(False):
        cpu = torch.tensor(values, dtype=dtype)
        return cpu.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else cpu


@dataclass
class StepPlan:
    """What one forward needs from the cache, as host lists: the slot of every new key (full and sliding pools),
    which new rows the sliding pool stores, each sequence's length after the step and its page-table rows."""

    full_slots: list[int]
    sliding_slots: list[int]
    sliding_keep: list[int]
    cu_q_lens: list[int]
    seq_lens: list[int]
    full_rows: list[list[int]]
    sliding_rows: list[list[int]]


def plan_step(
    cache: PagedKVCache,
    seqs: list[SequencePages],
    q_lens: list[int],
    fresh: bool,
    width: int | None = None,
    rows: bool = True,
) -> StepPlan:
    """Grow the sequences' pages for ``q_lens`` new tokens each and lay out where everything goes. Page-table rows
    are ``width`` wide (default: the longest sequence's pages); ``rows=False`` leaves them out (empty) for a caller
    that keeps its own tables."""
    page = cache.page_size
    has_full, has_sliding = not all(cache.sliding), cache.sliding_pool.num_pages > 0
    full_slots, sliding_slots, keep, seq_lens = [], [], [], []
    row = 0
    for seq, n in zip(seqs, q_lens, strict=True):
        start, end = seq.cached_len, seq.cached_len + n
        # Sliding layers: a fresh prefill attends over the new tokens directly, so only the keys a future query
        # can see (the last window - 1) are stored; an append reads its keys from the cache, so all are stored.
        first_stored = max(start, end - cache.window + 1) if fresh else start
        cache.grow(seq, end, first_stored)
        if has_full:
            full_slots.extend(seq.full[pos // page] * page + pos % page for pos in range(start, end))
        if has_sliding:
            sliding_slots.extend(seq.sliding[pos // page] * page + pos % page for pos in range(first_stored, end))
            keep.extend(range(row + first_stored - start, row + n))
        row += n
        seq_lens.append(end)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    needed = max(1, max(cache.pages_for(n, page) for n in seq_lens))
    if width is not None and width < needed:
        raise RuntimeError(f"rollout KV cache: a sequence needs {needed} pages, the step's tables hold {width}")
    width = width or needed
    full_rows = [_row(s.full, width) for s in seqs] if rows else []
    sliding_rows = [_row(s.sliding, width) for s in seqs] if rows else []
    _check(cache, full_rows, sliding_rows, full_slots, sliding_slots)
    return StepPlan(full_slots, sliding_slots, keep, cu, seq_lens, full_rows, sliding_rows)


def _row(pages: list[int], width: int) -> list[int]:
    return [max(p, 0) for p in pages] + [0] * (width - len(pages))


def _check(cache: PagedKVCache, full_rows, sliding_rows, full_slots, sliding_slots) -> None:
    """The per-step stand-in for the decode kernel's per-call value checks (host lists only: no GPU sync).
    Lengths and page-table widths hold by construction; page ids must lie in their pools."""
    page = cache.page_size
    for name, rows, slots, pool in (("full", full_rows, full_slots, cache.full_pool),
                                    ("sliding", sliding_rows, sliding_slots, cache.sliding_pool)):  # fmt: skip
        top = max((max(r) for r in rows if r), default=0)
        if (slots and not 0 <= min(slots) <= max(slots) < pool.num_pages * page) or top >= max(pool.num_pages, 1):
            raise RuntimeError(f"rollout KV cache: {name} page ids out of range (a bug in the engine)")


class CacheStep:
    """One forward's view of the cache (the model calls ``attend`` from every attention layer).

    ``fresh=True``: every sequence starts from an empty cache, so attention runs the varlen training kernel over
    the new tokens themselves (same kernel and math as the trainer) and the keys/values are only stored. Otherwise
    the new tokens append to what is cached and attention runs the paged decode kernel.

    Everything the kernels read (slots, page tables, lengths) is built here on the host and checked once per step,
    so the decode kernel is called with ``check_values=False`` and no layer waits for the GPU.
    """

    def __init__(self, cache: PagedKVCache, seqs: list[SequencePages], q_lens: list[int], fresh: bool) -> None:
        self.cache, self.fresh = cache, fresh
        plan = plan_step(cache, seqs, q_lens, fresh)
        device = cache.device
        self.max_q_len = max(q_lens)
        self.full_slots = to_device(plan.full_slots, torch.long, device)
        self.sliding_slots = to_device(plan.sliding_slots, torch.long, device)
        every_row = len(plan.sliding_keep) == sum(q_lens)
        self.sliding_keep = None if every_row else to_device(plan.sliding_keep, torch.long, device)  # None: all
        self.cu_q_lens = to_device(plan.cu_q_lens, torch.int32, device)
        self.seq_lens = to_device(plan.seq_lens, torch.int32, device)
        self.full_table = to_device(plan.full_rows, torch.int32, device)
        self.sliding_table = to_device(plan.sliding_rows, torch.int32, device)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        sliding = self.cache.sliding[layer_idx]
        if sliding:
            keep = self.sliding_keep
            flat_k.index_copy_(0, self.sliding_slots, k if keep is None else k[keep])
            flat_v.index_copy_(0, self.sliding_slots, v if keep is None else v[keep])
        else:
            flat_k.index_copy_(0, self.full_slots, k)
            flat_v.index_copy_(0, self.full_slots, v)
        if self.fresh:
            return sink_attention(q, k, v, sinks, self.cu_q_lens, self.max_q_len, window=window)
        table = self.sliding_table if sliding else self.full_table
        return paged_decode_attention(
            q, k_cache, v_cache, table, self.seq_lens, self.cu_q_lens, self.max_q_len, sinks, window=window,
            check_values=False,
        )  # fmt: skip

    def finish(self, seqs: list[SequencePages], q_lens: list[int]) -> None:
        for seq, n in zip(seqs, q_lens, strict=True):
            seq.cached_len += n
            self.cache.trim(seq)


@torch.library.custom_op("ossrl::cached_decode_attention", mutates_args=("k_cache", "v_cache"))
def cached_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """One decode token per sequence: store k/v [B, Hkv, D] at ``slots`` of the flattened cache, then attend over
    the pages (``window`` 0 = full attention). One opaque op for ``torch.compile``: the trace neither breaks at
    attention nor copies the cache it writes."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
    return paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, 1, sinks,
                                  window=window or None, check_values=False)  # fmt: skip


@cached_decode_attention.register_fake
def _(q, k, v, sinks, k_cache, v_cache, slots, page_table, seq_lens, cu_q_lens, window):
    return torch.empty_like(q)
