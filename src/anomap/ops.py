"""Plain tensor functions shared by the detectors: patch embedding, coreset selection, nearest
neighbours, blur. Everything works on CPU and CUDA tensors alike."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import AnomapError

# Largest block computed at once, in elements (4 Mi floats = 16 MB): small enough that a distance
# block is reduced while still in cache, large enough for efficient matrix products.
_BLOCK_ELEMENTS = 4 * 1024 * 1024
# On a GPU larger blocks keep the matrix products big enough to fill the device (256 MB in fp16).
_GPU_BLOCK_ELEMENTS = 128 * 1024 * 1024
PRECISIONS = ("fp32", "fp16", "bf16")
_GRAPH_STEPS = 128  # greedy coreset steps per captured CUDA graph


def half_dtype(precision: str) -> torch.dtype:
    """ "fp16" -> torch.float16, "bf16" -> torch.bfloat16; "fp32" -> torch.float32."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _block_rows(columns: int, device: torch.device) -> int:
    """Rows of a (rows, columns) block that fit the device's block budget."""
    budget = _GPU_BLOCK_ELEMENTS if device.type == "cuda" else _BLOCK_ELEMENTS
    return max(1, budget // max(1, columns))


def align_concat(
    features: dict[str, torch.Tensor], layers: Sequence[str], *, pool: int = 1, border: str = "zeros"
) -> torch.Tensor:
    """Average each map over a `pool` x `pool` neighbourhood, upsample to the first layer's grid, concatenate.

    With `border="zeros"` the average counts the zero padding beyond the border, as PatchCore's
    reference code does (it unfolds with zero padding): border patches are damped rather than
    averaged over fewer, noisier neighbours. On glass_fabric this raised PatchCore's image AUROC
    from 0.75 to 0.93 and AUPRO from 0.56 to 0.77 (benchmarks/patchcore.py). It also damps defects
    at the image edge; `border="reflect"` averages over the mirrored neighbours instead, so edge
    patches keep their strength (better maps at the edge, noisier image scores).

    Args:
        features: layer name -> (B, C_l, H_l, W_l).
        layers: the layers to use; the first one sets the grid (the shallowest).
        pool: neighbourhood size of the local average (1 = none).
        border: "zeros" or "reflect", the padding of that average beyond the map's edge.

    Returns:
        (B, sum C_l, H, W) with (H, W) the first layer's grid.
    """
    size = features[layers[0]].shape[-2:]
    maps = []
    for name in layers:
        fmap = features[name].float()
        if pool > 1:
            if border == "reflect":
                if min(fmap.shape[-2:]) < 2:
                    raise AnomapError(
                        f"border='reflect' needs feature maps of at least 2 x 2, the {name} map is "
                        f"{fmap.shape[-2]} x {fmap.shape[-1]}: use a larger image_size or crop"
                    )
                fmap = F.avg_pool2d(F.pad(fmap, (pool // 2,) * 4, mode="reflect"), pool, stride=1)
            else:
                fmap = F.avg_pool2d(fmap, pool, stride=1, padding=pool // 2, count_include_pad=True)
        if fmap.shape[-2:] != size:
            fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
        maps.append(fmap)
    return torch.cat(maps, dim=1)


def reduce_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the channel axis: (N, C) -> (N, dim)."""
    if dim >= x.shape[1]:
        return x
    return F.adaptive_avg_pool1d(x.unsqueeze(1), dim).squeeze(1)


def random_projection(dim_in: int, dim_out: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed Gaussian projection matrix (dim_in, dim_out), scaled to keep distances on average."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim_in, dim_out, generator=gen) / math.sqrt(dim_out)
    return proj.to(device)


def greedy_coreset(
    features: torch.Tensor, n: int, *, seed: int = 0, project_dim: int | None = 128, progress: bool = True
) -> torch.Tensor:
    """Greedy k-center selection (Gonzalez), on a random projection of the features.

    Each step adds the point farthest from all chosen ones. The exact greedy order is kept, but a
    step only re-measures the points the new center can be closer to: by the triangle inequality,
    point p can only gain when d(new, c_p) < 2 d(p, c_p), c_p being its nearest chosen center.
    On CPU the loop runs compiled (numba); on CUDA as torch operations.

    Args:
        features: (N, D) patch features (any float dtype; CPU or CUDA).
        n: number of points to select.
        seed: picks the first point and the projection.
        project_dim: distances are measured after projecting to this many dimensions (None: exact).
        progress: show a progress bar.

    Returns:
        (n,) int64 indices into `features` (on CPU), in selection order, all distinct.
    """
    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    if n < 1:
        raise AnomapError(f"coreset size must be at least 1, got {n}")
    x = _project(features, project_dim, seed)
    first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    bar = tqdm(total=n, desc="coreset", disable=None if progress else True)
    step = _greedy_cpu if x.device.type == "cpu" else _greedy_torch
    chosen, done = step(x, n, first, bar)
    bar.close()
    if done < n:  # every point coincides with a chosen one: fill with unchosen points in order
        rest = torch.ones(total, dtype=torch.bool)
        rest[chosen[:done]] = False
        chosen[done:] = rest.nonzero().squeeze(1)[: n - done]
    return chosen


def _greedy_cpu(x: torch.Tensor, n: int, first: int, bar) -> tuple[torch.Tensor, int]:
    """Greedy steps with the compiled kernel, in chunks so the progress bar moves."""
    from ._kernels import BLOCK, greedy_steps

    pts = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    xn = (pts * pts).sum(1)
    mind = ((pts - pts[first]) ** 2).sum(1)
    assign = np.zeros(len(pts), dtype=np.int64)
    centers = np.empty((n, pts.shape[1]), dtype=np.float32)
    cn, dc2 = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    chosen = np.empty(n, dtype=np.int64)
    chosen[0], centers[0], cn[0] = first, pts[first], xn[first]
    blocks = -(-len(pts) // BLOCK)
    padded = np.full(blocks * BLOCK, -1.0, dtype=np.float32)
    padded[: len(pts)] = mind
    bmax = padded.reshape(blocks, BLOCK).max(1)
    barg = padded.reshape(blocks, BLOCK).argmax(1) + np.arange(blocks) * BLOCK
    done = 1
    bar.update(1)
    while done < n:
        stop = min(n, done + 512)
        reached = greedy_steps(pts, xn, mind, assign, centers, cn, chosen, dc2, bmax, barg, done, stop)
        bar.update(reached - done)
        done = reached
        if reached < stop:
            break
    return torch.from_numpy(chosen), done


def _greedy_torch(x: torch.Tensor, n: int, first: int, bar, use_triton: bool | None = None) -> tuple[torch.Tensor, int]:
    """The same greedy steps on the device, for CUDA tensors: with the fused Triton kernels of
    `anomap._triton` where Triton is installed (it comes with CUDA builds of torch), else as torch
    operations.

    No pruning here: on a GPU one pass over all points costs less than finding the few points
    worth re-measuring. Every step stays on the device (no host sync), and steps are replayed
    `_GRAPH_STEPS` at a time from a captured CUDA graph, which removes the per-kernel launch cost.
    """
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    gain = torch.empty(n, dtype=x.dtype, device=x.device)  # distance of each chosen point
    chosen[0], gain[0] = first, 1.0
    if use_triton is None:
        use_triton = x.is_cuda and importlib.util.find_spec("triton") is not None
    if use_triton:
        from ._triton import GreedySweep

        steps = GreedySweep(x, first, chosen, gain).steps
    else:
        steps = _torch_steps(x, first, chosen, gain)
    i, graph = 1, None
    while i < n:
        count = min(_GRAPH_STEPS, n - i)
        if graph is not None and count == _GRAPH_STEPS:
            graph.replay()
        elif x.is_cuda and graph is None and count == _GRAPH_STEPS and n - i >= 2 * _GRAPH_STEPS:
            side = torch.cuda.Stream(x.device)  # warm-up steps on a side stream, as capture wants
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                steps(count)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                steps(_GRAPH_STEPS)
        else:
            steps(count)
        i += count
        bar.update(count)
    covered = (gain <= 0).nonzero()  # a chosen point at distance 0: every point was already covered
    done = int(covered[0]) if len(covered) else n
    return chosen.cpu(), done


def _torch_steps(x: torch.Tensor, first: int, chosen: torch.Tensor, gain: torch.Tensor):
    """Greedy steps as torch operations; returns steps(count), appending at a device-side counter."""
    xn = x.pow(2).sum(1)
    mind = (x - x[first]).pow_(2).sum(1)
    step = torch.ones(1, dtype=torch.long, device=x.device)

    def steps(count: int) -> None:
        for _ in range(count):
            new = mind.argmax().view(1)
            chosen.index_copy_(0, step, new)
            gain.index_copy_(0, step, mind.index_select(0, new))
            d2 = torch.addmv(xn, x, x.index_select(0, new)[0], alpha=-2).add_(xn.index_select(0, new))
            torch.minimum(mind, d2, out=mind)
            step.add_(1)

    return steps


def _project(features: torch.Tensor, project_dim: int | None, seed: int) -> torch.Tensor:
    """(N, D) -> (N, min(D, project_dim)) float32, projected in blocks to bound memory."""
    if project_dim is None or project_dim >= features.shape[1]:
        return features.float()
    proj = random_projection(features.shape[1], project_dim, seed, features.device)
    rows = max(1, _BLOCK_ELEMENTS // features.shape[1])
    return torch.cat([features[s : s + rows].float() @ proj for s in range(0, features.shape[0], rows)])


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, exclude: torch.Tensor | None = None):
    """k nearest bank entries of each query, by Euclidean distance, computed in bounded blocks.

    Args:
        queries: (M, D).
        bank: (K, D), same device.
        k: neighbours per query.
        exclude: optional (K,) bool; True entries are never returned.

    Returns:
        distances (M, k) ascending, indices (M, k) int64.
    """
    bank_sq = bank.pow(2).sum(1)
    rows = _block_rows(bank.shape[0], bank.device)
    dists, idxs = [], []
    for s in range(0, queries.shape[0], rows):
        q = queries[s : s + rows]
        d2 = torch.addmm(bank_sq, q, bank.T, alpha=-2).add_(q.pow(2).sum(1, keepdim=True))
        if exclude is not None:
            d2[:, exclude] = float("inf")
        val, idx = d2.min(1, keepdim=True) if k == 1 else torch.topk(d2, k, dim=1, largest=False)
        dists.append(val.clamp_(min=0).sqrt_())
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


class HalfBank(NamedTuple):
    """A memory bank prepared for half-precision search: centered, scaled to norms <= 1."""

    bank: torch.Tensor  # (K, D) half
    sq: torch.Tensor  # (K,) half, squared norms of `bank`
    center: torch.Tensor  # (D,) float32
    scale: float


def half_bank(bank: torch.Tensor, dtype: torch.dtype) -> HalfBank:
    """(K, D) float32 bank -> `HalfBank` in `dtype` (float16 or bfloat16). Centering and scaling
    keep squared norms near 1, where half precision resolves distances best and cannot overflow."""
    center = bank.mean(0)
    x = bank - center
    scale = float(x.norm(dim=1).max().clamp(min=1e-12))
    x = x / scale
    return HalfBank(x.to(dtype), x.pow(2).sum(1).to(dtype), center, scale)


def knn_half(queries: torch.Tensor, hb: HalfBank, k: int = 1) -> torch.Tensor:
    """Approximate distances (M, k), ascending, from (M, D) float32 queries to their k nearest
    entries of a `HalfBank`; errors about 1e-3 (float16) or 1e-2 (bfloat16) of the bank's radius."""
    rows = _block_rows(hb.bank.shape[0], hb.bank.device)
    dists = []
    for s in range(0, queries.shape[0], rows):
        q = (queries[s : s + rows] - hb.center) / hb.scale
        d2 = torch.addmm(hb.sq, q.to(hb.bank.dtype), hb.bank.T, alpha=-2)  # |b|^2 - 2 q.b, (m, K)
        best = d2.min(1, keepdim=True).values if k == 1 else torch.topk(d2, k, dim=1, largest=False).values
        d2 = best.float().add_(q.pow(2).sum(1, keepdim=True))
        dists.append(d2.clamp_(min=0).sqrt_().mul_(hb.scale))
    return torch.cat(dists)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, kernel radius 4 sigma, reflected borders."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, *size)."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
