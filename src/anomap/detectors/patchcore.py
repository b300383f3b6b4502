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

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import layer_info
from ..errors import AnomapError
from ..metrics import sigma_threshold
from ..ops import (HalfBank, align_concat, faiss_index, faiss_knn, gaussian_blur, greedy_coreset, half_bank, half_dtype,
                   knn, knn_half, reduce_channels, upsample)
from .base import Detector, Prediction
from .features import Encoder

SAMPLERS = ("coreset", "random", "none")
NN_BACKENDS = ("torch", "faiss")
RECHECK = 8  # highest patches per image re-measured in float32 when searching in half precision


class PatchCore(Detector):
    """PatchCore anomaly detector.

    Args:
        backbone, layers, weights, image_size, crop, device, batch_size: the feature pipeline
            (see `anomap.detectors.features.Encoder`).
        target_dim: reduce patch features to this many channels (adaptive average pooling over
            channels); None keeps all.
        sampler: "coreset" (greedy k-center), "random" (seeded fraction) or "none" (all patches).
        coreset_ratio: fraction of patches kept by "coreset" and "random".
        coreset_chunk: at most this many patches per sampler block (see above); None: one block.
        project_dim: dimension of the random projection the coreset distances are measured on.
        k: nearest neighbours averaged into a patch score.
        nn_backend: "torch" (exact, chunked, CPU or CUDA) or "faiss" (exact flat L2 index, CPU;
            needs `pip install anomap[faiss]`). The leave-out threshold always uses torch.
        reweight: apply the paper's Eq. 7 reweighting to the image score.
        reweight_neighbors: bank neighbourhood size used by the reweighting.
        blur_sigma: Gaussian blur of the anomaly map, in pixels.
        precision: "fp32"; or "fp16" / "bf16": the backbone runs under autocast and nearest
            neighbours are searched in half precision, then each image's `RECHECK` highest patches
            re-measured in fp32 (for GPUs; fp16 image scores agree with fp32 to a rank correlation
            above 0.999, see benchmarks/gpu.py).
        threshold_images: at most this many training images give the leave-out threshold.
        seed: seeds the coreset, the random sampler and the threshold image choice.
    """

    method = "patchcore"

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights: str = "imagenet",
        image_size: int = 256,
        crop: int | None = None,
        target_dim: int | None = None,
        sampler: str = "coreset",
        coreset_ratio: float = 0.1,
        coreset_chunk: int | None = 250_000,
        project_dim: int = 128,
        k: int = 1,
        nn_backend: str = "torch",
        reweight: bool = False,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        precision: str = "fp32",
        threshold_images: int = 200,
        device: str = "auto",
        batch_size: int = 16,
        seed: int = 42,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self.image_size = image_size
        self.crop = crop
        self.target_dim = target_dim
        self.sampler = sampler
        self.coreset_ratio = coreset_ratio
        self.coreset_chunk = coreset_chunk
        self.project_dim = project_dim
        self.k = k
        self.nn_backend = nn_backend
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.blur_sigma = blur_sigma
        self.precision = precision
        self.threshold_images = threshold_images
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def _embedding_dim(self) -> int:
        channels, _ = layer_info(self.backbone, self.layers)
        total = sum(channels.values())
        return total if self.target_dim is None else min(total, self.target_dim)

    def _embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, h, w, D) patch embeddings."""
        x = align_concat(feats, self.layers, pool=3).permute(0, 2, 3, 1)
        if self.target_dim is not None:
            x = reduce_channels(x.reshape(-1, x.shape[-1]), self.target_dim).reshape(*x.shape[:3], -1)
        return x

    def fit(self, images) -> PatchCore:
        """Build the memory bank from normal images (Samples, paths or arrays) and set the threshold."""
        if self.sampler not in SAMPLERS:
            raise AnomapError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.nn_backend not in NN_BACKENDS:
            raise AnomapError(f"unknown nn_backend {self.nn_backend!r}; use one of {', '.join(NN_BACKENDS)}")
        if not 0 < self.coreset_ratio <= 1:
            raise AnomapError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_chunk is not None and self.coreset_chunk < 1:
            raise AnomapError(f"coreset_chunk must be a positive number of patches, got {self.coreset_chunk}")
        if len(images) < 1:
            raise AnomapError("fit needs at least one training image")
        self.encoder_ = Encoder.for_detector(self)
        gen = torch.Generator().manual_seed(self.seed)
        count = min(self.threshold_images, len(images))
        held = torch.randperm(len(images), generator=gen)[:count].sort().values  # threshold images
        bank, source, held_patches = self._stream_bank(images, held)
        self.memory_bank_ = bank.to(torch.float32)
        self._index = self._half_bank = None
        self.fitted_ = True
        self.train_scores_ = self._leave_out_scores(held_patches, held.tolist(), source)
        self.set_threshold(sigma_threshold(self.train_scores_))
        return self

    def _stream_bank(self, images, held: torch.Tensor):
        """Stream the images in blocks of at most `coreset_chunk` patches, subsampling each block.

        Returns:
            bank (n, D) float16, source (n,) image index of each entry, and the (len(held), h*w, D)
            float16 patches of the `held` images.
        """
        device = self.encoder_.device
        block, filled, start, picks, sources, held_patches = None, 0, 0, [], [], []
        held_set = set(held.tolist())
        for feats in self.encoder_.batches(images, "fit features"):
            emb = self._embed(feats).to(torch.float16)  # (B, h, w, D)
            if block is None:
                self.grid_ = tuple(emb.shape[1:3])
                per_image = self.grid_[0] * self.grid_[1]
                rows = len(images) if self.coreset_chunk is None else max(1, self.coreset_chunk // per_image)
                block = torch.empty((min(rows, len(images)), per_image, emb.shape[-1]), dtype=torch.float16,
                                    device=device)
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
                    flat = block[:filled].reshape(-1, block.shape[-1])
                    keep = self._subsample(flat)
                    picks.append(flat[keep])
                    sources.append(keep.div(per_image, rounding_mode="floor").to(device) + start)
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
        against the bank without its own entries."""
        scores = []
        for i, q in zip(tqdm(held, desc="threshold", unit="img", disable=None), patches):
            exclude = source == i
            if bool(exclude.all()):
                raise AnomapError("the threshold needs at least two training images")
            scores.append(self._score(q[None].float(), exclude)[0])
        return torch.cat(scores).cpu().numpy()

    def _score(self, q: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, D) patches -> image scores (B,), patch scores (B, P)."""
        b, p, d = q.shape
        k = min(self.k, self.memory_bank_.shape[0])
        approximate = self.nn_backend == "torch" and self.precision != "fp32" and exclude is None
        if self.nn_backend == "faiss" and exclude is None:
            dist = faiss_knn(self._faiss_index(), q.reshape(-1, d), k)[0]
        elif approximate:
            dist = knn_half(q.reshape(-1, d), self._half(), k)
        else:
            dist = knn(q.reshape(-1, d), self.memory_bank_, k, exclude=exclude)[0]
        patch = dist.mean(1).reshape(b, p)
        if approximate:
            patch = self._recheck(q, patch, k)
        top = patch.argmax(1)  # (B,) the most anomalous patch of each image
        image = patch.gather(1, top[:, None]).squeeze(1)
        if self.reweight:
            worst = q[torch.arange(b), top]
            nearest = knn(worst, self.memory_bank_, 1, exclude=exclude)[1][:, 0]
            image = image * self._reweight(worst, nearest)
        return image, patch

    def _recheck(self, q: torch.Tensor, patch: torch.Tensor, k: int) -> torch.Tensor:
        """Re-measure each image's `RECHECK` highest approximate patch scores exactly, in float32,
        so that image scores are exact."""
        top = patch.topk(min(RECHECK, patch.shape[1]), dim=1).indices  # (B, m)
        worst = q.gather(1, top[..., None].expand(-1, -1, q.shape[2])).reshape(-1, q.shape[2])
        exact = knn(worst, self.memory_bank_, k)[0].mean(1).reshape(top.shape)
        return patch.scatter(1, top, exact)

    def _half(self) -> HalfBank:
        """The memory bank prepared for half-precision search, made on first use."""
        if getattr(self, "_half_bank", None) is None:
            self._half_bank = half_bank(self.memory_bank_, half_dtype(self.precision))
        return self._half_bank

    def _faiss_index(self):
        """The faiss index of the memory bank, built on first use."""
        if getattr(self, "_index", None) is None:
            self._index = faiss_index(self.memory_bank_)
        return self._index

    def _reweight(self, worst: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7: (B, D) worst test patches, (B,) their nearest bank entries -> (B,) weights."""
        n = min(self.reweight_neighbors, self.memory_bank_.shape[0])
        _, support = knn(self.memory_bank_[nearest], self.memory_bank_, n)  # (B, n), support[:, 0] = nearest
        dist = torch.linalg.vector_norm(self.memory_bank_[support] - worst[:, None], dim=2)  # (B, n)
        return 1 - F.softmax(dist, dim=1)[:, 0]

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) anomaly maps."""
        self._check_fitted()
        scores, maps = [], []
        for batch in self.encoder_.input_batches(images, "predict"):
            image, amap = self.score_batch(batch)
            scores.append(image.cpu())
            maps.append(amap.cpu())
        return Prediction(torch.cat(scores).numpy(), torch.cat(maps).numpy(), self.threshold_)

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B, 3, S, S) images -> image scores (B,) and maps (B, S, S), as float32
        tensors on the detector's device (no copies to the host: the fast path for tensors already
        on a GPU)."""
        self._check_fitted()
        with torch.inference_mode():
            q = self._embed(self.encoder_.features(batch))
            b, h, w, d = q.shape
            image, patch = self._score(q.reshape(b, h * w, d))
            amap = gaussian_blur(upsample(patch.reshape(b, h, w), self.encoder_.size), self.blur_sigma)
        return image, amap

    def _get_state(self):
        tensors = {"memory_bank": self.memory_bank_, "train_scores": torch.from_numpy(self.train_scores_)}
        return tensors, {"grid": list(self.grid_)}

    def _set_state(self, tensors, state) -> None:
        bank = tensors["memory_bank"]
        dim = self._embedding_dim()
        if bank.ndim != 2 or bank.shape[1] != dim or bank.shape[0] < 1:
            raise ValueError(f"memory bank of shape {tuple(bank.shape)}, expected (n, {dim})")
        self.encoder_ = Encoder.for_detector(self)
        self.memory_bank_ = bank.to(self.encoder_.device, torch.float32)
        self._index = self._half_bank = None
        self.train_scores_ = tensors["train_scores"].numpy()
        self.grid_ = tuple(state["grid"])
        self.fitted_ = True
