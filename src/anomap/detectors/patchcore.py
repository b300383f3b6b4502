"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Fit: locally aggregated patch features of every training image -> memory bank, subsampled by a
greedy coreset. Predict: each test patch's distance to its nearest bank entries is its score; the
image score is the largest patch score; the map is the upsampled, blurred patch score grid.

The image score is the plain maximum by default (`reweight=False`). The paper's reweighting (Eq. 7)
scales it by 1 - softmax weight of the nearest entry among its own `reweight_neighbors` bank
neighbours; measured on the bundled sets it changes AUROC by little (see benchmarks/patchcore.py),
while the plain maximum is simpler to interpret and to threshold.

Large training sets: features stream through the backbone in blocks of at most `coreset_chunk`
patches (consecutive images); each block is reduced by its own sampler at `coreset_ratio` and the
memory bank is the union of the blocks' picks. Memory is bounded by one block plus the bank, and
the greedy coreset's cost, which grows with (patches x picks), grows only linearly with the number
of images. Sets of up to `coreset_chunk` patches (e.g. 240 images at 256 px with a stride-8 grid)
form one block: the exact greedy coreset.

Default threshold (set by `fit`): mean + 3 sigma of leave-out scores of up to `threshold_images`
training images, each scored against the bank with its own patches removed, so the scores behave
like those of unseen normal images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import ann
from ..backbones import layer_info
from ..encoder import FeatureParams
from ..errors import AnomapError
from ..ops import (
    PRECISIONS,
    HalfBank,
    align_concat,
    gaussian_blur,
    greedy_coreset,
    half_bank,
    half_dtype,
    knn,
    knn_half,
    reduce_channels,
    upsample,
)
from ..params import BLUR_SIGMA, THRESHOLD_IMAGES, Bool, Choice, Float, Int, Maybe, param
from .base import Detector, expect_shape, state_grid

SAMPLERS = ("coreset", "random", "none")
SEARCHES = ("auto", "exact", "faiss", "ivf")
IVF_MIN_BANK = 50_000  # search="auto" uses the IVF index from this many bank entries on
BORDERS = ("zeros", "reflect")
RECHECK = 8  # highest patches per image re-measured exactly after an approximate search


@dataclass(kw_only=True, repr=False, eq=False)
class PatchCore(Detector, FeatureParams):
    """PatchCore anomaly detector. Parameters: see `anomap.params` declarations below and
    `FeatureParams` (backbone, layers, weights) and `Detector` (image_size, crop, device,
    batch_size, seed: seeds the coreset, the random sampler and the threshold image choice)."""

    method = "patchcore"
    min_train_images = 2

    target_dim: int | None = param(
        None,
        Maybe(Int(1, 65536)),
        "reduce patch features to this many channels (average pooling over channels); null keeps all",
    )
    sampler: str = param(
        "coreset", Choice(SAMPLERS), "coreset (greedy k-center), random (seeded fraction) or none (all patches)"
    )
    coreset_ratio: float = param(0.1, Float(0, 1, open_lo=True), "fraction of patches kept in the memory bank")
    coreset_chunk: int | None = param(
        100_000, Maybe(Int(1, 10**9)), "at most this many patches per sampler block (null: one block)"
    )
    project_dim: int = param(
        128, Int(1, 65536), "dimension of the random projection the coreset distances are measured on"
    )
    k: int = param(1, Int(1, 1000), "nearest memory bank entries averaged into a patch score")
    search: str = param(
        "auto",
        Choice(SEARCHES),
        "exact (chunked, CPU or CUDA), faiss (exact flat index, "
        f"CPU), ivf (approximate, sublinear), or auto: ivf on CPU from {IVF_MIN_BANK} bank entries on",
    )
    ivf_probe: int = param(16, Int(1, 100_000), "IVF cells visited per query (more: closer to exact)")
    reweight: bool = param(False, Bool(), "apply the paper's Eq. 7 reweighting to the image score")
    reweight_neighbors: int = param(9, Int(1, 1000), "bank neighbourhood size used by the reweighting")
    border: str = param(
        "zeros",
        Choice(BORDERS),
        "padding of the 3x3 patch neighbourhood at the image edge: zeros damps edge patches "
        "(steadier image scores), reflect keeps defects at the edge as strong (better maps there)",
    )
    blur_sigma: float = param(4.0, BLUR_SIGMA, "Gaussian blur of the anomaly map, in pixels")
    precision: str = param(
        "fp32",
        Choice(PRECISIONS),
        "fp32; or fp16 / bf16: the backbone under autocast and "
        f"a half-precision search, each image's {RECHECK} highest patches re-measured in fp32",
    )
    threshold_images: int = param(
        200, THRESHOLD_IMAGES, "at most this many training images give the leave-out threshold"
    )

    def _embedding_dim(self) -> int:
        channels, _ = layer_info(self.backbone, self.layers)
        total = sum(channels.values())
        return total if self.target_dim is None else min(total, self.target_dim)

    def _embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, h, w, D) patch embeddings."""
        x = align_concat(feats, self.layers, pool=3, border=self.border).permute(0, 2, 3, 1)
        if self.target_dim is not None:
            x = reduce_channels(x.reshape(-1, x.shape[-1]), self.target_dim).reshape(*x.shape[:3], -1)
        return x

    def _fit(self, images) -> np.ndarray:
        """Build the memory bank from normal images; return the held images' leave-out scores."""
        held = self.held_images(len(images))
        return self.finish_bank(*self._stream_bank(images, held), held)

    def held_images(self, n: int) -> torch.Tensor:
        """(m,) sorted indices, among n training images, of those that give the threshold (seeded)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=gen)[: min(self.threshold_images, n)].sort().values

    def block_images(self, per_image: int, n: int) -> int:
        """How many consecutive training images (of n, with `per_image` patches each) form one
        coreset block."""
        return n if self.coreset_chunk is None else min(n, max(1, self.coreset_chunk // per_image))

    def block_bank(self, patches: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsample one block: (m, P, D) float16 patches of training images start .. start + m - 1
        -> bank entries (n, D) float16 and the training image index of each (n,)."""
        flat = patches.reshape(-1, patches.shape[-1])
        keep = self._subsample(flat)
        return flat[keep], keep.div(patches.shape[1], rounding_mode="floor").to(flat.device) + start

    def finish_bank(
        self, picks: torch.Tensor, sources: torch.Tensor, held_patches: torch.Tensor, held: torch.Tensor
    ) -> np.ndarray:
        """Keep the joined block picks (n, D) as the memory bank; return the leave-out scores of the
        `held` images, whose (len(held), P, D) patches are given (`grid_` must be set)."""
        self.memory_bank_ = picks.to(torch.float32)
        self._index = self._half_bank = self.ivf_centroids_ = None
        return self._leave_out_scores(held_patches, held.tolist(), sources)

    def _stream_bank(self, images, held: torch.Tensor):
        """Stream the images through the backbone in coreset blocks (`block_images`).

        Returns:
            bank (n, D) float16, source (n,) image index of each entry, and the (len(held), h*w, D)
            float16 patches of the `held` images.
        """
        block, filled, start, picks, sources, held_patches = None, 0, 0, [], [], []
        held_set = set(held.tolist())
        for feats in self._feature_batches(images, "fit features"):
            emb = self._embed(feats).to(torch.float16)  # (B, h, w, D)
            if block is None:
                self.grid_ = tuple(emb.shape[1:3])
                rows = self.block_images(self.grid_[0] * self.grid_[1], len(images))
                block = torch.empty(
                    (rows, emb.shape[1] * emb.shape[2], emb.shape[3]), dtype=torch.float16, device=self.device_
                )
            emb = emb.reshape(emb.shape[0], -1, emb.shape[-1])
            for j in range(emb.shape[0]):
                if start + filled + j in held_set:
                    held_patches.append(emb[j].clone())  # a copy: a view would keep the whole batch
            taken = 0
            while taken < emb.shape[0]:  # a batch may straddle two blocks
                n = min(emb.shape[0] - taken, block.shape[0] - filled)
                block[filled : filled + n] = emb[taken : taken + n]
                filled, taken = filled + n, taken + n
                if filled == block.shape[0] or start + filled == len(images):
                    bank, source = self.block_bank(block[:filled], start)
                    picks.append(bank)
                    sources.append(source)
                    start, filled = start + filled, 0
        return torch.cat(picks), torch.cat(sources), torch.stack(held_patches)

    def _subsample(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) candidate patches -> (n,) indices of the bank entries, sorted."""
        total = flat.shape[0]
        n = max(1, int(round(total * self.coreset_ratio)))
        if self.sampler == "none" or n >= total:
            return torch.arange(total, device=flat.device)
        if self.sampler == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randperm(total, generator=gen)[:n].sort().values.to(flat.device)
        return greedy_coreset(flat, n, seed=self.seed, project_dim=self.project_dim).sort().values.to(flat.device)

    def _leave_out_scores(self, patches: torch.Tensor, held: list[int], source: torch.Tensor) -> np.ndarray:
        """Image scores of the held training images (patches (H, P, D), indices `held`), each
        against the bank without its own entries (a contiguous range: blocks keep image order)."""
        scores = []
        for i, q in zip(tqdm(held, desc="threshold", unit="img", disable=None), patches):
            own = (int(torch.searchsorted(source, i)), int(torch.searchsorted(source, i, right=True)))
            if own[1] - own[0] == len(source):
                raise AnomapError("the threshold needs at least two training images")
            scores.append(self._score(q[None].float(), own)[0])
        return torch.cat(scores).cpu().numpy()

    def _search_kind(self) -> str:
        """The search in use: `search`, with "auto" resolved by the device and the bank size (a GPU
        searches any bank exactly faster than faiss on the host could approximately)."""
        if self.search != "auto":
            return self.search
        large = self.memory_bank_.shape[0] >= IVF_MIN_BANK
        return "ivf" if large and self.memory_bank_.device.type == "cpu" else "exact"

    def _knn(self, q: torch.Tensor, k: int, own: tuple[int, int] | None) -> tuple[torch.Tensor, bool]:
        """(M, D) queries -> distances (M, k) to the bank without rows `own`, and whether they
        are approximate."""
        kind = self._search_kind()
        if kind == "ivf":
            return ann.search(self._ivf(), q, k, self.ivf_probe, own)[0], True
        if kind == "faiss":
            return ann.search(self._flat(), q, k, exclude=own)[0], False
        if self.precision != "fp32" and own is None:
            return knn_half(q, self._half(), k), True
        return knn(q, self.memory_bank_, k, exclude=self._mask(own))[0], False

    def _mask(self, own: tuple[int, int] | None) -> torch.Tensor | None:
        """(K,) bool, True on the bank rows `own`; None for none."""
        if own is None:
            return None
        mask = torch.zeros(self.memory_bank_.shape[0], dtype=torch.bool, device=self.memory_bank_.device)
        mask[own[0] : own[1]] = True
        return mask

    def _score(self, q: torch.Tensor, own: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, D) patches -> image scores (B,), patch scores (B, P); `own`: bank rows left out."""
        b, p, d = q.shape
        k = min(self.k, self.memory_bank_.shape[0])
        dist, approximate = self._knn(q.reshape(-1, d), k, own)
        patch = dist.mean(1).reshape(b, p)
        if approximate:
            patch = self._recheck(q, patch, k, own)
        top = patch.argmax(1)  # (B,) the most anomalous patch of each image
        image = patch.gather(1, top[:, None]).squeeze(1)
        if self.reweight:
            worst = q[torch.arange(b), top]
            nearest = knn(worst, self.memory_bank_, 1, exclude=self._mask(own))[1][:, 0]
            image = image * self._reweight(worst, nearest)
        return image, patch

    def _recheck(self, q: torch.Tensor, patch: torch.Tensor, k: int, own: tuple[int, int] | None) -> torch.Tensor:
        """Re-measure each image's `RECHECK` highest approximate patch scores exactly, in float32,
        so that image scores are exact."""
        top = patch.topk(min(RECHECK, patch.shape[1]), dim=1).indices  # (B, m)
        worst = q.gather(1, top[..., None].expand(-1, -1, q.shape[2])).reshape(-1, q.shape[2])
        exact = knn(worst, self.memory_bank_, k, exclude=self._mask(own))[0].mean(1).reshape(top.shape)
        return patch.scatter(1, top, exact)

    def _half(self) -> HalfBank:
        """The memory bank prepared for half-precision search, made on first use."""
        if getattr(self, "_half_bank", None) is None:
            self._half_bank = half_bank(self.memory_bank_, half_dtype(self.precision))
        return self._half_bank

    def _flat(self):
        """The exact faiss index of the memory bank, built on first use."""
        if getattr(self, "_index", None) is None:
            self._index = ann.flat_index(self.memory_bank_)
        return self._index

    def _ivf(self):
        """The IVF index of the memory bank, built on first use from the stored centroids (seeded
        k-means on the bank when there are none yet)."""
        if getattr(self, "_index", None) is None:
            if getattr(self, "ivf_centroids_", None) is None:
                nlist = ann.cells(self.memory_bank_.shape[0])
                self.ivf_centroids_ = ann.ivf_centroids(self.memory_bank_, nlist, self.seed)
            self._index = ann.ivf_index(self.memory_bank_, self.ivf_centroids_)
        return self._index

    def _reweight(self, worst: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7: (B, D) worst test patches, (B,) their nearest bank entries -> (B,) weights."""
        n = min(self.reweight_neighbors, self.memory_bank_.shape[0])
        _, support = knn(self.memory_bank_[nearest], self.memory_bank_, n)  # (B, n), support[:, 0] = nearest
        dist = torch.linalg.vector_norm(self.memory_bank_[support] - worst[:, None], dim=2)  # (B, n)
        return 1 - F.softmax(dist, dim=1)[:, 0]

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._embed(self.encoder_.features(batch))
        b, h, w, d = q.shape
        image, patch = self._score(q.reshape(b, h * w, d))
        return image, gaussian_blur(upsample(patch.reshape(b, h, w), self.encoder_.size), self.blur_sigma)

    def _get_state(self):
        tensors = {"memory_bank": self.memory_bank_}
        if getattr(self, "ivf_centroids_", None) is not None:
            tensors["ivf_centroids"] = self.ivf_centroids_
        return tensors, {"grid": list(self.grid_)}

    def _check_state(self, tensors, state) -> None:
        bank = expect_shape(tensors, "memory_bank", (None, self._embedding_dim()))
        if "ivf_centroids" in tensors:
            centroids = expect_shape(tensors, "ivf_centroids", (None, bank.shape[1]))
            if centroids.shape[0] > bank.shape[0]:
                raise ValueError(f"{centroids.shape[0]} IVF centroids for {bank.shape[0]} bank entries")
        state_grid(state, self.image_size)

    def _set_state(self, tensors, state) -> None:
        self.memory_bank_ = tensors["memory_bank"].to(self.device_, torch.float32)
        self.ivf_centroids_ = tensors.get("ivf_centroids")
        self._index = self._half_bank = None
        self.grid_ = state_grid(state, self.image_size)
