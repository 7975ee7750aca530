"""Fused importance scoring + pruning over one flat buffer cut into segments (Triton).

The k-th smallest score of every segment is found by a four-pass radix select over the bits of
the float32 score (non-negative floats order like their bit patterns): bits 30..23, 22..15,
14..7 and 6..0, one histogram kernel per pass. Every program recomputes the digits chosen so far
from the histograms, so no select kernel runs in between. A count kernel then counts, per tile,
the scores below and equal to the k-th one; one cumsum turns those into the per-tile offsets the
mask kernel needs to break ties by position (lower flat index pruned first) and to compact the
kept values.

Launches per call: zeroed scratch + 4 histograms + count + cumsum + mask, whatever the number of
segments. Nothing is read back to the host except the count of NaN/Inf inputs, which the caller
checks once at the end. See kernels/reference.py for the semantics. Needs Triton >= 3.4
(tl.histogram with a mask); measured on an H200 with Triton 3.6.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import triton
import triton.language as tl

CRITERIA = {"l1": 0, "delta": 1, "taylor": 2}
TILE = 16384    # values per program at most (a tile never crosses a segment boundary)
BLOCK = 1024    # values per loop step inside a tile
HIST = 1024     # histogram slots per segment: 256 + 256 + 256 + 128 bins, padded
# (bins, first slot, shift of the digit, shift of the digits already chosen) of each pass:
# bits 30..23, 22..15, 14..7 and 6..0 of the key. Small digits keep tl.histogram cheap: its
# cost grows with the number of bins.
PASSES = ((256, 0, 23, 31), (256, 256, 15, 23), (256, 512, 7, 15), (128, 768, 0, 7))


@triton.jit
def _importance_key(x_ptr, y_ptr, idx, valid, CRITERION: tl.constexpr):
    """The score's bit pattern as int32 (order-preserving) and whether every input is finite."""
    x = tl.load(x_ptr + idx, mask=valid, other=0.0)
    xb = x.to(tl.int32, bitcast=True)
    finite = (xb & 0x7F800000) != 0x7F800000
    if CRITERION == 0:
        key = xb & 0x7FFFFFFF
    else:
        y = tl.load(y_ptr + idx, mask=valid, other=0.0)
        finite = finite & ((y.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000)
        if CRITERION == 1:
            s = x - y
        else:
            s = x * y
        key = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key, finite


@triton.jit
def _importance_digit(hist_ptr, k_rem, OFFSET: tl.constexpr, BINS: tl.constexpr):
    """The bin holding the k_rem-th value (1-based) and k_rem relative to that bin."""
    h = tl.load(hist_ptr + OFFSET + tl.arange(0, BINS))
    below = tl.cumsum(h, 0) - h
    digit = tl.sum((below < k_rem).to(tl.int32), 0) - 1
    k_rem = k_rem - tl.sum(tl.where(tl.arange(0, BINS) < digit, h, 0), 0)
    return digit, k_rem


@triton.jit
def _importance_select(hist_ptr, k, PASSES: tl.constexpr):
    """Key prefix and remaining rank after the first PASSES radix passes (see PASSES above)."""
    prefix = tl.zeros((), dtype=tl.int32)
    k_rem = k
    if PASSES >= 1:
        d0, k_rem = _importance_digit(hist_ptr, k_rem, 0, 256)
        prefix = prefix | (d0 << 23)
    if PASSES >= 2:
        d1, k_rem = _importance_digit(hist_ptr, k_rem, 256, 256)
        prefix = prefix | (d1 << 15)
    if PASSES >= 3:
        d2, k_rem = _importance_digit(hist_ptr, k_rem, 512, 256)
        prefix = prefix | (d2 << 7)
    if PASSES >= 4:
        d3, k_rem = _importance_digit(hist_ptr, k_rem, 768, 128)
        prefix = prefix | d3
    return prefix, k_rem


@triton.jit
def _importance_tile(tiles_ptr, n_prune_ptr):
    tile = tl.program_id(0).to(tl.int64)
    start = tl.load(tiles_ptr + tile * 4)
    end = tl.load(tiles_ptr + tile * 4 + 1)
    seg = tl.load(tiles_ptr + tile * 4 + 2)
    first = tl.load(tiles_ptr + tile * 4 + 3)
    k = tl.load(n_prune_ptr + seg)
    return tile, start, end, seg, first, k


@triton.jit
def _importance_histogram_kernel(x_ptr, y_ptr, tiles_ptr, n_prune_ptr, hist_ptr, bad_ptr,
                                 PASS: tl.constexpr, BINS: tl.constexpr, OFFSET: tl.constexpr,
                                 SHIFT: tl.constexpr, PREFIX_SHIFT: tl.constexpr,
                                 CRITERION: tl.constexpr, TILE: tl.constexpr,
                                 BLOCK: tl.constexpr):
    tile, start, end, seg, first, k = _importance_tile(tiles_ptr, n_prune_ptr)
    seg_hist = hist_ptr + seg * 1024
    prefix, k_rem = _importance_select(seg_hist, k, PASS)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    n_bad = tl.zeros((), dtype=tl.int32)
    # A constant trip count (tiles shorter than TILE are masked): no loop bound from memory.
    for i in range(0, TILE, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        valid = idx < end
        key, finite = _importance_key(x_ptr, y_ptr, idx, valid, CRITERION)
        match = valid & (k > 0)
        if PASS == 0:
            n_bad += tl.sum((valid & ~finite).to(tl.int32), 0)
        else:
            match = match & ((key >> PREFIX_SHIFT) == (prefix >> PREFIX_SHIFT))
        counts += tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=match)
    if PASS == 0:
        tl.atomic_add(bad_ptr, n_bad.to(tl.int64), mask=n_bad > 0)
    tl.atomic_add(seg_hist + OFFSET + tl.arange(0, BINS), counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _importance_count_kernel(x_ptr, y_ptr, tiles_ptr, n_prune_ptr, hist_ptr, counts_ptr, n_tiles,
                             CRITERION: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """Per tile: how many scores are below the segment's k-th one (row 0 of counts), and how
    many equal it (row 1)."""
    tile, start, end, seg, first, k = _importance_tile(tiles_ptr, n_prune_ptr)
    threshold, k_rem = _importance_select(hist_ptr + seg * 1024, k, 4)
    n_less = tl.zeros((), dtype=tl.int64)
    n_equal = tl.zeros((), dtype=tl.int64)
    for i in range(0, TILE, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        valid = (idx < end) & (k > 0)
        key, finite = _importance_key(x_ptr, y_ptr, idx, valid, CRITERION)
        n_less += tl.sum((valid & (key < threshold)).to(tl.int32), 0)
        n_equal += tl.sum((valid & (key == threshold)).to(tl.int32), 0)
    tl.store(counts_ptr + tile, n_less)
    tl.store(counts_ptr + n_tiles + tile, n_equal)


@triton.jit
def _importance_mask_kernel(x_ptr, y_ptr, tiles_ptr, n_prune_ptr, pruned_before_ptr, hist_ptr,
                            counts_ptr, scan_ptr, n_tiles, mask_ptr, kept_values_ptr,
                            kept_indices_ptr, CRITERION: tl.constexpr, COMPACT: tl.constexpr,
                            TILE: tl.constexpr, BLOCK: tl.constexpr):
    tile, start, end, seg, first, k = _importance_tile(tiles_ptr, n_prune_ptr)
    threshold, n_equal_pruned = _importance_select(hist_ptr + seg * 1024, k, 4)
    # Exclusive in-segment prefix counts from the inclusive scan over all tiles.
    less_before = (tl.load(scan_ptr + tile) - tl.load(counts_ptr + tile)
                   - tl.load(scan_ptr + first) + tl.load(counts_ptr + first))
    equal_before = (tl.load(scan_ptr + n_tiles + tile) - tl.load(counts_ptr + n_tiles + tile)
                    - tl.load(scan_ptr + n_tiles + first)
                    + tl.load(counts_ptr + n_tiles + first))
    kept_before = (start - tl.load(pruned_before_ptr + seg) - less_before
                   - tl.minimum(equal_before, n_equal_pruned))
    for i in range(0, TILE, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        valid = idx < end
        key, finite = _importance_key(x_ptr, y_ptr, idx, valid, CRITERION)
        equal = (valid & (key == threshold)).to(tl.int32)
        equal_rank = equal_before + tl.cumsum(equal, 0) - equal
        pruned = (k > 0) & ((key < threshold) | ((equal != 0) & (equal_rank < n_equal_pruned)))
        keep = valid & ~pruned
        tl.store(mask_ptr + idx, keep.to(tl.uint8), mask=valid)
        if COMPACT:
            kept = keep.to(tl.int32)
            pos = kept_before + tl.cumsum(kept, 0) - kept
            x = tl.load(x_ptr + idx, mask=keep, other=0.0)
            tl.store(kept_values_ptr + pos, x, mask=keep)
            tl.store(kept_indices_ptr + pos, idx, mask=keep)
            kept_before += tl.sum(kept, 0)
        equal_before += tl.sum(equal, 0)


@lru_cache(maxsize=32)
def _launch_tables(segment_sizes: tuple[int, ...], n_prune: tuple[int, ...], tile: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device: tiles as int64 [n_tiles, 4] (start, end, segment, the segment's first
    tile), the prune count of each segment and the number pruned in the segments before it."""
    rows = []
    start = 0
    for seg, size in enumerate(segment_sizes):
        first = len(rows)
        for lo in range(start, start + size, tile):
            rows.append((lo, min(lo + tile, start + size), seg, first))
        start += size
    k = torch.tensor(n_prune, dtype=torch.int64)
    per_segment = torch.stack([k, torch.cumsum(k, 0) - k]).to(device)
    return torch.tensor(rows, dtype=torch.int64).to(device), per_segment[0], per_segment[1]


def importance_mask(values: torch.Tensor, other: torch.Tensor | None, criterion: str,
                    segment_sizes: Sequence[int], n_prune: Sequence[int],
                    return_compact: bool = False, *, tile: int | None = None,
                    block: int | None = None):
    """Prunes n_prune[s] values of each segment of a flat float32 buffer.

    Returns (keep mask as uint8, kept float32 values, their int64 flat indices, number of
    NaN/Inf inputs as a 0-d int64 device tensor); the compacted ones are None unless
    return_compact. tile/block (powers of two) default to the module's TILE/BLOCK.
    The caller validates sizes and reads the NaN/Inf count (one host sync) when it wants to.
    """
    tile = TILE if tile is None else tile  # read at call time: tests shrink them
    block = BLOCK if block is None else block
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {tuple(CRITERIA)}")
    if values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
        raise ValueError("values must be a contiguous 1-D float32 tensor")
    if (other is None) != (criterion == "l1") or (
            other is not None and (other.shape != values.shape or other.dtype != torch.float32
                                   or not other.is_contiguous())):
        raise ValueError(f"criterion={criterion!r}: other must be None for l1, else a contiguous "
                         "float32 tensor shaped like values")
    if block & (block - 1) or block < 16 or tile & (tile - 1) or tile < block:
        raise ValueError(f"tile={tile}, block={block}: powers of two, 16 <= block <= tile")
    sizes = tuple(int(s) for s in segment_sizes)
    n_prune = tuple(int(k) for k in n_prune)
    if sum(sizes) != values.numel() or len(n_prune) != len(sizes) or min(sizes) < 1:
        raise ValueError("segment_sizes must be positive and cover values, one n_prune each")
    # Small segments get small tiles: every program loops over TILE values, masked past its end.
    tile = min(tile, max(16, triton.next_power_of_2(max(sizes))))
    block = min(block, tile)
    device = values.device
    tiles, k, pruned_before = _launch_tables(sizes, n_prune, tile, device)
    n_tiles = tiles.shape[0]
    # One zeroed scratch: the histograms, then the NaN/Inf counter.
    scratch = torch.zeros(len(sizes) * HIST + 1, dtype=torch.int64, device=device)
    hist, n_bad = scratch[:-1], scratch[-1]
    counts = torch.empty(n_tiles * 2, dtype=torch.int64, device=device)
    y = values if other is None else other
    grid = (n_tiles,)
    common = dict(CRITERION=CRITERIA[criterion], TILE=tile, BLOCK=block, num_warps=8)
    for p, (bins, offset, shift, prefix_shift) in enumerate(PASSES):
        _importance_histogram_kernel[grid](values, y, tiles, k, hist, n_bad, PASS=p, BINS=bins,
                                           OFFSET=offset, SHIFT=shift,
                                           PREFIX_SHIFT=prefix_shift, **common)
    _importance_count_kernel[grid](values, y, tiles, k, hist, counts, n_tiles, **common)
    # Rows of [2, n_tiles]: a scan along the contiguous dim (the strided one was 100 us on H200).
    scan = torch.cumsum(counts.view(2, n_tiles), 1).view(-1)
    mask = torch.empty(values.numel(), dtype=torch.uint8, device=device)
    if return_compact:
        n_kept = values.numel() - sum(n_prune)
        kept_values = torch.empty(n_kept, dtype=torch.float32, device=device)
        kept_indices = torch.empty(n_kept, dtype=torch.int64, device=device)
    else:
        kept_values = kept_indices = None
    _importance_mask_kernel[grid](values, y, tiles, k, pruned_before, hist, counts, scan,
                                  n_tiles, mask,
                                  kept_values if return_compact else mask,
                                  kept_indices if return_compact else mask,
                                  COMPACT=return_compact, **common)
    return mask, kept_values, kept_indices, n_bad
