"""The paged KV cache: a pool of fixed-size pages per layer, a page list per sequence, and the
metadata of one step that every layer shares.

Layout: per layer, ``k[layer]`` and ``v[layer]`` are ``[num_pages, heads, page_size, head_dim]``
tensors (keys after RoPE). A page holds ``page_size`` consecutive positions of one sequence, each
head's positions contiguous (attention streams them: 16 KiB a head for 64 bf16 positions of 128
dims). Position ``p`` of a sequence lives on page ``pages[p // page_size]`` at offset
``p % page_size``. Pages are taken as positions are written and given back when a sequence ends
or is preempted; nothing cached is ever moved (the one copy: a tail page's positions, into the
page of a request that continues them; PagePool.release_tail).

The pool is one allocation per layer made when the engine is built, sized by ``kv_cache_budget``.
On the CPU it is ``torch.empty``: the operating system commits its memory as pages are first
written, so an engine with a large budget costs only what its sequences really write.

The prefix cache lives in the same pool. A full page is published under a chained key: blake2b
of the previous page's key and this page's token ids, the chain starting from a salt that holds
everything else that changes a page's contents (the sequence's dynamic-NTK alpha, since keys are
stored after RoPE; the dtype; the cache format). A key so names the whole prefix up to the end of
its page, and a request finds its longest cached prefix by looking up its own keys in order: one
dict lookup per page. Chained hashes rather than a radix tree (SGLang's) because the page is
already the unit that requests share, reference-count and evict: a flat dict of page keys needs
no tree to keep balanced, split or walk, and eviction is an LRU list of pages nobody holds. What
a tree gives beyond that, reuse at token granularity, matters at one place: the last, partly
filled page of a finished sequence, which the next turn of a chat continues. Those pages are kept
as tails (PagePool.release_tail): under the key of the full pages before them, with their token
ids; a request that continues one copies the matching positions into a page of its own (one page
copy, about 12 MiB for 1.8B in bf16, against recomputing up to 63 tokens).

StepMetadata is what the kernels read for one forward over a step's packed tokens (prefill chunks
and decode rows together): the page table of the step's sequences, each token's sequence and
position, and the most keys any token reads. It is built once per step (and copied to the device
once, on CUDA) and shared by every layer.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .config import QwenConfig

#: Positions per page. Measured with benchmarks/bench_paged.py --part pages (decode attention over
#: 24 layers at 4096 cached tokens, bf16, 2 threads; attention's GB/s over linear's on the same
#: bytes, same run), at a 60-65 GB/s read pass: 16 -> 0.70-0.72, 32 -> 0.82, 64 -> 0.89-0.92,
#: 128 and 256 -> 0.83-0.95 (noise), 4096 (one page per head: the contiguous layout) -> 0.99;
#: at 35-37 GB/s every size from 32 up reads at 0.90-0.99. 64 is the smallest page that keeps
#: attention at about 90% of linear's rate; smaller pages waste less (a page is 12 MiB over the
#: 24 layers of 1.8B in bf16) and share better between prompts, larger ones buy nothing measurable.
DEFAULT_PAGE_SIZE = 64


#: Bytes of an int8 cache's scale (fp32; keys and values each have theirs).
KV_SCALE_BYTES = 4


def check_kv_group(cfg: QwenConfig, kv_group: Optional[int]) -> int:
    """The int8 cache's scale group (elements of a position's head per scale): kv_group, or
    head_dim for None; it must divide head_dim and be a multiple of 16 (the kernels' vectors)."""
    g = cfg.head_dim if kv_group is None else kv_group
    if (not isinstance(g, int) or isinstance(g, bool) or g < 16 or g % 16
            or cfg.head_dim % g):
        raise ValueError(f"kv_group must be a multiple of 16 that divides head_dim "
                         f"({cfg.head_dim}), got {kv_group!r}")
    return g


def bytes_per_token(cfg: QwenConfig, dtype: torch.dtype, kv_group: Optional[int] = None) -> int:
    """Bytes of keys + values one position of one sequence takes (192 KiB for 1.8B in bf16;
    for torch.int8, the int8 cache: codes plus a KV_SCALE_BYTES scale per kv_group elements,
    99 KiB with one scale per head)."""
    per_head = cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    if dtype == torch.int8:
        per_head += KV_SCALE_BYTES * (cfg.head_dim // check_kv_group(cfg, kv_group))
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * per_head


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.0 KiB, 1.5 MiB, 2.00 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class PagePool:
    """The pages of every layer, their reference counts, the free list and the prefix cache's
    index. Not thread-safe: the scheduler (under its engine's lock) takes and returns pages.

    A page is free, held (by one or more requests: its reference count), or cached: published
    under a key (module docstring), or kept as a tail, and held by nobody, kept until the pool
    needs room and then evicted, least recently released first. Cached pages count as available
    (num_free): they never make a request wait, preempt one or refuse one."""

    def __init__(self, cfg: QwenConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_dtype: Optional[torch.dtype] = None,
                 kv_group: Optional[int] = None):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.page_size = page_size
        self.num_pages = num_pages
        # kv_dtype: what the pages hold (default: the model's dtype); torch.int8 is the int8
        # cache: codes, and per layer k_scales/v_scales [pages, H, P, head_dim // kv_group] fp32
        # (reference.quantize_kv; kv_group None = one scale per position and head).
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        if self.kv_dtype not in (dtype, torch.int8):
            raise ValueError(f"the KV cache holds the model's dtype ({dtype}) or torch.int8, "
                             f"got {self.kv_dtype}")
        shape = (num_pages, cfg.num_attention_heads, page_size, cfg.head_dim)
        L = cfg.num_hidden_layers
        self.k = [torch.empty(shape, dtype=self.kv_dtype, device=device) for _ in range(L)]
        self.v = [torch.empty(shape, dtype=self.kv_dtype, device=device) for _ in range(L)]
        self.k_scales: Optional[List[torch.Tensor]] = None
        self.v_scales: Optional[List[torch.Tensor]] = None
        self.kv_group: Optional[int] = None
        if self.kv_dtype == torch.int8:
            self.kv_group = check_kv_group(cfg, kv_group)
            sshape = (*shape[:3], cfg.head_dim // self.kv_group)
            self.k_scales = [torch.empty(sshape, device=device) for _ in range(L)]
            self.v_scales = [torch.empty(sshape, device=device) for _ in range(L)]
        # Popped from the end: the lowest ids are handed out first, so that a light load keeps
        # to the start of the pool (memory the OS has already committed).
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self._ref = [0] * num_pages
        self._cached: Dict[bytes, int] = {}         # key -> page
        self._key_of: Dict[int, bytes] = {}         # page -> key
        self._evictable: "OrderedDict[int, None]" = OrderedDict()   # cached, unheld; LRU first
        # Tail pages: the last, partly computed page of a finished sequence, kept under the key
        # of the full pages before it (its parent) with the token ids it holds. A request whose
        # prompt continues a tail's parent with some of its tokens copies those positions into
        # a page of its own (a tail is never written again, nor held).
        self._tails: Dict[bytes, Dict[int, tuple]] = {}   # parent key -> {page: token ids}
        self._tail_of: Dict[int, bytes] = {}               # page -> parent key
        self.peak_used = 0
        self.evictions = 0

    @classmethod
    def for_budget(cls, cfg: QwenConfig, budget: int, page_size: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu", max_pages: Optional[int] = None,
                   kv_dtype: Optional[torch.dtype] = None,
                   kv_group: Optional[int] = None) -> "PagePool":
        """The pool that fits `budget` bytes (at most max_pages pages)."""
        n = budget // cls.page_bytes(cfg, page_size, kv_dtype or dtype, kv_group)
        if max_pages is not None:
            n = min(n, max_pages)
        return cls(cfg, max(1, n), page_size, dtype, device, kv_dtype, kv_group)

    @staticmethod
    def page_bytes(cfg: QwenConfig, page_size: int, dtype: torch.dtype,
                   kv_group: Optional[int] = None) -> int:
        """Bytes of one page over all layers, for pages holding dtype (torch.int8: the int8
        cache, scales included)."""
        return page_size * bytes_per_token(cfg, dtype, kv_group)

    @property
    def bytes_per_page(self) -> int:
        return self.page_bytes(self.cfg, self.page_size, self.kv_dtype, self.kv_group)

    @property
    def num_free(self) -> int:
        """Pages a request can take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages held by requests."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages published in the prefix cache (held or not)."""
        return len(self._cached)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def take(self, n: int) -> List[int]:
        """n pages for one request (the caller checked num_free): free ones first, then the
        least recently released cached ones, evicted from the cache."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV pages with {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                if page in self._key_of:
                    del self._cached[self._key_of.pop(page)]
                else:
                    self._drop_tail(page)
                self.evictions += 1
            self._ref[page] = 1
            out.append(page)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def give_back(self, pages: Sequence[int]) -> None:
        """A request lets go of its pages: a cached page nobody else holds becomes evictable
        (the most recently released last), any other unheld page free."""
        for page in reversed(pages):
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if page in self._key_of or page in self._tail_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # ---- the prefix cache's index ---------------------------------------------------------------
    def match(self, keys: Sequence[bytes]) -> List[int]:
        """The cached pages of the longest prefix of `keys`."""
        out = []
        for key in keys:
            page = self._cached.get(key)
            if page is None:
                break
            out.append(page)
        return out

    def is_evictable(self, page: int) -> bool:
        return page in self._evictable

    def share(self, pages: Sequence[int]) -> None:
        """Another request holds these cached pages (found by match)."""
        for page in pages:
            if self._ref[page] == 0:
                del self._evictable[page]
            self._ref[page] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def publish(self, page: int, key: bytes) -> None:
        """Index a full page under its key (a page already published, or a key already cached
        with another page, is left as it is)."""
        if key not in self._cached and page not in self._key_of:
            self._cached[key] = page
            self._key_of[page] = key

    def clear_cache(self) -> None:
        """Forget every key and tail; cached pages nobody holds become free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._key_of.clear()
        self._tails.clear()
        self._tail_of.clear()

    # ---- tail pages ----------------------------------------------------------------------------
    @property
    def num_tails(self) -> int:
        return len(self._tail_of)

    def release_tail(self, page: int, parent: bytes, tokens: Sequence[int]) -> None:
        """A finishing request lets go of its last page, which holds the computed positions of
        `tokens` (fewer than page_size) after the full pages keyed `parent`: it becomes a tail
        (evictable like a cached page; release it before the request's other pages, so that it
        goes before them), unless a tail of the same parent already holds these tokens; tails
        that hold a prefix of them are dropped."""
        tokens = tuple(tokens)
        if not 0 < len(tokens) < self.page_size or self._ref[page] != 1:
            raise RuntimeError(f"page {page} cannot become a tail ({len(tokens)} tokens, "
                               f"{self._ref[page]} holders)")
        for other, held in list(self._tails.get(parent, {}).items()):
            if held[:len(tokens)] == tokens:        # already there: this page is not needed
                self.give_back([page])
                return
            if tokens[:len(held)] == held and self._ref[other] == 0:   # this one holds more
                del self._evictable[other]
                self._drop_tail(other)
                self._free.append(other)
        self._tails.setdefault(parent, {})[page] = tokens
        self._tail_of[page] = parent
        self._ref[page] = 0
        self._evictable[page] = None

    def match_tail(self, parent: bytes, tokens: Sequence[int]) -> tuple[Optional[int], int]:
        """The tail of `parent` that shares the longest run of leading ids with `tokens`, and
        that run's length (None, 0 when no tail shares one)."""
        best, best_n = None, 0
        for page, held in self._tails.get(parent, {}).items():
            n = 0
            for a, b in zip(held, tokens):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = page, n
        return best, best_n

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Positions 0 .. n - 1 of page src into page dst, in every layer (keys and values)."""
        for pool in (*self.k, *self.v, *(self.k_scales or ()), *(self.v_scales or ())):
            pool[dst, :, :n].copy_(pool[src, :, :n])

    def _drop_tail(self, page: int) -> None:
        parent = self._tail_of.pop(page)
        kin = self._tails[parent]
        del kin[page]
        if not kin:
            del self._tails[parent]


def page_keys(tokens: Sequence[int], page_size: int, salt: bytes,
              prev: Sequence[bytes] = ()) -> List[bytes]:
    """Chained keys of the full pages of `tokens`: key i = blake2b(key i-1, the page's token ids),
    key -1 = salt (what else changes the page's contents: NTK alpha, dtype, cache format). prev:
    keys already computed for the first pages."""
    out = list(prev)
    for i in range(len(out), len(tokens) // page_size):
        h = hashlib.blake2b(out[-1] if out else salt, digest_size=16)
        h.update(torch.tensor(tokens[i * page_size:(i + 1) * page_size], dtype=torch.int64).numpy().tobytes())
        out.append(h.digest())
    return out


@dataclass
class StepMetadata:
    """The paged metadata of one forward, shared by every layer (ops.attention's arguments).

    page_table: [sequences, max_pages] int32 (-1 past a sequence's pages); token_seq, token_pos:
    [N] int32, each packed token's sequence (a row of page_table) and absolute position;
    max_keys: max(token_pos) + 1. All on the model's device. positions ([N] int64) and counts
    (tokens of each sequence) stay on the host, for the rotary tables and the logits rows."""
    page_table: torch.Tensor
    token_seq: torch.Tensor
    token_pos: torch.Tensor
    max_keys: int
    positions: torch.Tensor
    counts: List[int]

    @classmethod
    def build(cls, pages: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int],
              device: torch.device | str = "cpu") -> "StepMetadata":
        """Sequence b of the step holds pages[b] and computes positions starts[b] ..
        starts[b] + counts[b] - 1 (its tokens come in that order, sequence after sequence)."""
        width = max(1, max(len(p) for p in pages))
        S, N = len(pages), sum(counts)
        # One Python list, then one tensor: a decode step's metadata in two torch calls (the
        # tensor ops this took before cost about 0.3 ms a step in the engine's step thread).
        vals: List[int] = []
        for p in pages:
            vals += p
            vals += [-1] * (width - len(p))
        for b, n in enumerate(counts):
            vals += [b] * n
        pos_list = [i for s, n in zip(starts, counts) for i in range(s, s + n)]
        vals += pos_list
        host = torch.tensor(vals, dtype=torch.int32)
        table = host[:S * width].view(S, width)
        seq = host[S * width:S * width + N]
        pos = host[S * width + N:]
        positions = torch.tensor(pos_list, dtype=torch.long)
        max_keys = max(s + n for s, n in zip(starts, counts))
        if torch.device(device).type != "cpu":
            host = host.pin_memory().to(device, non_blocking=True)   # one copy for all three
            table = host[:S * width].view(S, width)
            seq = host[S * width:S * width + N]
            pos = host[S * width + N:]
        return cls(table, seq, pos, max_keys, positions, list(counts))
