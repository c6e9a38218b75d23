"""A paged KV cache and a packed step for the kernel tests of rotary_kv_cache and attention.

A step is given as one (cached, new) pair per sequence: sequence s already holds `cached` keys
and this step brings `new` tokens at positions cached .. cached + new - 1 (new = 1: a decode
row, more: a prefill chunk, 0: a sequence that sits this step out). Its pages are drawn from a
shuffled pool, so that neighbouring positions live on pages far apart; the pool's spare pages
and the page table's unused entries (which name spare pages) are what `poison_pools` fills, so
that a kernel that reads a page it should not reads poison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedStep:
    page_table: torch.Tensor   # [num_seqs, ld_pt] int32
    token_seq: torch.Tensor    # [N] int32
    token_pos: torch.Tensor    # [N] int32
    num_pages: int
    page_size: int
    lengths: list[int]         # keys each sequence holds after the step
    spare: torch.Tensor        # [spare_pages] int64, pages no sequence owns

    def to(self, device) -> "PagedStep":
        return PagedStep(self.page_table.to(device), self.token_seq.to(device),
                         self.token_pos.to(device), self.num_pages, self.page_size, self.lengths,
                         self.spare)

    @property
    def n_tokens(self) -> int:
        return self.token_seq.numel()


def paged_step(seqs: list[tuple[int, int]], page_size: int, gen: torch.Generator, *,
               spare_pages: int = 3, spare_columns: int = 1,
               shuffle_rows: bool = False) -> PagedStep:
    """The page table and per-token metadata of a step (see the module docstring). The tokens are
    packed sequence after sequence (in a random order with shuffle_rows)."""
    P = page_size
    lengths = [c + n for c, n in seqs]
    need = [(L + P - 1) // P for L in lengths]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    spare = perm[sum(need):]
    ld_pt = max(need) + spare_columns
    table = torch.empty(len(seqs), ld_pt, dtype=torch.int32)
    at = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[at:at + n]
        at += n
        # Entries past the sequence's pages name spare (poisoned) pages.
        table[s, n:] = spare[torch.randint(0, spare_pages, (ld_pt - n,), generator=gen)]
    token_seq = torch.tensor([s for s, (c, n) in enumerate(seqs) for _ in range(n)],
                             dtype=torch.int32)
    token_pos = torch.tensor([p for c, n in seqs for p in range(c, c + n)], dtype=torch.int32)
    if shuffle_rows:
        order = torch.randperm(token_seq.numel(), generator=gen)
        token_seq, token_pos = token_seq[order], token_pos[order]
    return PagedStep(table, token_seq, token_pos, num_pages, P, lengths, spare)


def held_slots(step: PagedStep) -> torch.Tensor:
    """[num_pages, P] bool: the page slots that hold a key of some sequence after the step."""
    held = torch.zeros(step.num_pages, step.page_size, dtype=torch.bool)
    for s, L in enumerate(step.lengths):
        for p in range(L):
            held[int(step.page_table[s, p // step.page_size]), p % step.page_size] = True
    return held


def poison_pools(k_pages: torch.Tensor, v_pages: torch.Tensor, step: PagedStep,
                 value: float = float("nan")) -> None:
    """Fill every page slot that holds no key (spare pages, the tail of a sequence's last page)
    with `value`, in place."""
    free = ~held_slots(step).to(k_pages.device)
    for pages in (k_pages, v_pages):
        pages.permute(0, 2, 1, 3)[free] = value
