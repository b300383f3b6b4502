"""CUDA kernels (Triton) for the greedy coreset: each step is two launches, one pass over the
points that measures, updates and reduces at once, and one tiny pick of the next center."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ELEMENTS = 16384  # (rows x padded dims) loaded per program of the sweep


@triton.jit
def _sweep(
    x_ptr, xn_ptr, mind_ptr, new_ptr, bmax_ptr, barg_ptr, n, d, DP: tl.constexpr, ROWS: tl.constexpr
):  # pragma: no cover - compiled
    """mind = min(mind, |x - x[new]|^2) for one block of rows; the block's max and first argmax."""
    pid = tl.program_id(0)
    new = tl.load(new_ptr)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, DP)
    valid, cvalid = rows < n, cols < d
    c = tl.load(x_ptr + new * d + cols, mask=cvalid, other=0.0)
    xb = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=valid[:, None] & cvalid[None, :], other=0.0)
    dot = tl.sum(xb * c[None, :], axis=1)
    d2 = tl.maximum(tl.load(xn_ptr + rows, mask=valid, other=0.0) + tl.load(xn_ptr + new) - 2.0 * dot, 0.0)
    m = tl.minimum(tl.load(mind_ptr + rows, mask=valid, other=-1.0), d2)
    m = tl.where(valid, m, -1.0)
    tl.store(mind_ptr + rows, m, mask=valid)
    best, arg = tl.max(m, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(bmax_ptr + pid, best)
    tl.store(barg_ptr + pid, pid * ROWS + arg)


@triton.jit
def _pick(
    bmax_ptr, barg_ptr, blocks, new_ptr, step_ptr, chosen_ptr, gain_ptr, NB: tl.constexpr
):  # pragma: no cover - compiled
    """The farthest point over all blocks becomes the next center, written at position `step`."""
    offs = tl.arange(0, NB)
    v = tl.load(bmax_ptr + offs, mask=offs < blocks, other=-1.0)
    best, b = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
    new = tl.load(barg_ptr + b)
    step = tl.load(step_ptr)
    tl.store(new_ptr, new)
    tl.store(chosen_ptr + step, new)
    tl.store(gain_ptr + step, best)
    tl.store(step_ptr, step + 1)


class GreedySweep:
    """Greedy k-center state on the device. `steps(count)` appends `count` centers to `chosen`
    (and their distances to `gain`) without any host synchronisation, so it can be captured in a
    CUDA graph.

    Args:
        x: (N, D) contiguous float32 points; `first`: the first center, already in chosen[0].
        chosen: (n,) int64 output; gain: (n,) float32 output.
    """

    def __init__(self, x: torch.Tensor, first: int, chosen: torch.Tensor, gain: torch.Tensor) -> None:
        self.x, self.chosen, self.gain = x.contiguous(), chosen, gain
        self.n, self.d = x.shape
        self.dp = triton.next_power_of_2(self.d)
        self.rows = max(1, min(1024, _ELEMENTS // self.dp))
        self.blocks = triton.cdiv(self.n, self.rows)
        self.nb = triton.next_power_of_2(self.blocks)
        self.xn = self.x.pow(2).sum(1)
        self.mind = torch.full((self.n,), float("inf"), device=x.device)
        self.bmax = torch.empty(self.blocks, device=x.device)
        self.barg = torch.empty(self.blocks, dtype=torch.long, device=x.device)
        self.new = torch.full((1,), first, dtype=torch.long, device=x.device)
        self.step = torch.ones(1, dtype=torch.long, device=x.device)
        self._sweep()  # distances to the first center

    def _sweep(self) -> None:
        _sweep[(self.blocks,)](
            self.x,
            self.xn,
            self.mind,
            self.new,
            self.bmax,
            self.barg,
            self.n,
            self.d,
            DP=self.dp,
            ROWS=self.rows,
            num_warps=8,
        )

    def steps(self, count: int) -> None:
        for _ in range(count):
            _pick[(1,)](
                self.bmax, self.barg, self.blocks, self.new, self.step, self.chosen, self.gain, NB=self.nb, num_warps=8
            )
            self._sweep()
