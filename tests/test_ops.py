import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from anomap.errors import AnomapError
from anomap.ops import (
    PRECISIONS,
    align_concat,
    gaussian_blur,
    greedy_coreset,
    half_bank,
    half_dtype,
    knn,
    knn_half,
    random_projection,
    reduce_channels,
)


def naive_greedy(x: torch.Tensor, n: int, first: int) -> list[int]:
    """Plain farthest-point selection: recompute every distance each step."""
    chosen = [first]
    mind = torch.cdist(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, n):
        new = int(mind.argmax())
        chosen.append(new)
        mind = torch.minimum(mind, torch.cdist(x, x[new : new + 1]).squeeze(1))
    return chosen


@pytest.mark.parametrize("n_points,dim,n", [(500, 8, 50), (2000, 32, 300), (300, 200, 299)])
def test_coreset_matches_naive_greedy(n_points, dim, n):
    gen = torch.Generator().manual_seed(n_points)
    x = torch.randn(n_points, dim, generator=gen) * torch.rand(n_points, 1, generator=gen)
    got = greedy_coreset(x, n, seed=3, project_dim=None, progress=False)
    first = int(got[0])
    assert got.tolist() == naive_greedy(x, n, first)


def test_coreset_uses_projection_and_is_deterministic():
    x = torch.randn(1000, 300, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(x, 40, seed=5, project_dim=16, progress=False)
    b = greedy_coreset(x, 40, seed=5, project_dim=16, progress=False)
    assert torch.equal(a, b)
    projected = x @ random_projection(300, 16, 5)
    assert a.tolist() == naive_greedy(projected, 40, int(a[0]))
    assert len(set(a.tolist())) == 40


def test_coreset_with_duplicate_points_returns_distinct_indices():
    x = torch.zeros(50, 4)
    x[:3] = torch.eye(4)[:3]
    got = greedy_coreset(x, 10, seed=0, project_dim=None, progress=False)
    assert len(set(got.tolist())) == 10


def test_coreset_covers_clusters():
    # Five tight, far-apart clusters: five centers must hit all five.
    gen = torch.Generator().manual_seed(1)
    centers = torch.arange(5.0)[:, None] * 100 * torch.ones(1, 3)
    x = (centers[:, None, :] + torch.randn(5, 40, 3, generator=gen)).reshape(-1, 3)
    got = greedy_coreset(x, 5, seed=0, project_dim=None, progress=False)
    assert sorted((got // 40).tolist()) == [0, 1, 2, 3, 4]


def test_knn_matches_brute_force_and_excludes():
    gen = torch.Generator().manual_seed(2)
    q, bank = torch.randn(70, 6, generator=gen), torch.randn(90, 6, generator=gen)
    dist, idx = knn(q, bank, k=3)
    ref = torch.cdist(q, bank).topk(3, largest=False)
    assert torch.equal(idx, ref.indices)
    assert torch.allclose(dist, ref.values, atol=1e-4)
    exclude = torch.zeros(90, dtype=torch.bool)
    exclude[ref.indices[:, 0]] = True
    _, idx2 = knn(q, bank, k=1, exclude=exclude)
    assert not exclude[idx2[:, 0]].any()


def test_blur_preserves_constant_and_mass_and_spreads_peak():
    const = torch.full((2, 40, 40), 3.0)
    assert torch.allclose(gaussian_blur(const, 4.0), const, atol=1e-5)
    peak = torch.zeros(1, 101, 101)
    peak[0, 50, 50] = 1.0
    out = gaussian_blur(peak, 4.0)[0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert out.argmax().item() == 50 * 101 + 50
    # Variance of the blurred impulse is sigma^2 along each axis.
    ys = torch.arange(101.0) - 50
    assert (out.sum(1) * ys**2).sum().item() == pytest.approx(16.0, rel=0.02)


def test_align_concat_shapes_and_local_average():
    feats = {"a": torch.ones(2, 3, 8, 8), "b": torch.ones(2, 5, 4, 4) * 2}
    out = align_concat(feats, ("a", "b"), pool=3)
    assert out.shape == (2, 8, 8, 8)
    # away from the zero-padded border (wider for "b", whose 4x4 grid is upsampled)
    assert torch.allclose(out[:, :3, 1:7, 1:7], torch.ones(1))
    assert torch.allclose(out[:, 3:, 3:5, 3:5], torch.full((1,), 2.0))
    # the padding counts: a corner averages 4 real values and 5 zeros, an edge 6 and 3
    assert out[0, 0, 0, 0].item() == pytest.approx(4 / 9) and out[0, 0, 0, 4].item() == pytest.approx(6 / 9)
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    pooled = align_concat({"a": x}, ("a",), pool=3)
    assert pooled[0, 0, 1, 1].item() == pytest.approx(1.0)
    assert pooled[0, 0, 0, 0].item() == 0.0


def test_align_concat_reflect_averages_mirrored_neighbours():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    zeros = align_concat({"a": x}, ("a",), pool=3)
    out = align_concat({"a": x}, ("a",), pool=3, border="reflect")
    torch.testing.assert_close(out[..., 1:3, 1:3], zeros[..., 1:3, 1:3])  # the same inside
    mirrored = torch.tensor([[5.0, 4, 5], [1, 0, 1], [5, 4, 5]])  # corner (0, 0): rows -1..1, cols -1..1
    assert out[0, 0, 0, 0].item() == pytest.approx(mirrored.mean().item())
    assert out[0, 0, 0, 0].item() > zeros[0, 0, 0, 0].item()  # not damped by zeros
    with pytest.raises(AnomapError, match="at least 2 x 2"):
        align_concat({"a": torch.ones(1, 1, 1, 3)}, ("a",), pool=3, border="reflect")


def test_reduce_channels_averages_groups():
    x = torch.arange(8.0).repeat(3, 1)
    assert torch.allclose(reduce_channels(x, 4)[0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    assert reduce_channels(x, 16) is x


def test_random_projection_roughly_preserves_distances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 512, generator=gen)
    y = x @ random_projection(512, 128, 0)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert abs(ratio.mean().item() - 1) < 0.05
    assert np.percentile(ratio.numpy(), 99) < 1.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_coreset_cuda_matches_cpu():
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(4))
    # 600 steps: more than two captured CUDA graphs' worth, plus eager remainder steps
    cpu = greedy_coreset(x, 600, seed=1, project_dim=None, progress=False)
    gpu = greedy_coreset(x.cuda(), 600, seed=1, project_dim=None, progress=False)
    assert cpu.tolist() == gpu.tolist()


def test_coreset_torch_kernel_matches_naive(monkeypatch):
    import anomap.ops as ops

    monkeypatch.setattr(ops, "_greedy_cpu", ops._greedy_torch)
    x = torch.randn(800, 16, generator=torch.Generator().manual_seed(6))
    got = ops.greedy_coreset(x, 60, seed=2, project_dim=None, progress=False)
    assert got.tolist() == naive_greedy(x, 60, int(got[0]))


def test_coreset_torch_kernel_handles_duplicate_points(monkeypatch):
    import anomap.ops as ops

    monkeypatch.setattr(ops, "_greedy_cpu", ops._greedy_torch)
    x = torch.zeros(50, 4)
    x[:3] = torch.eye(4)[:3]
    got = ops.greedy_coreset(x, 10, seed=0, project_dim=None, progress=False)
    assert len(set(got.tolist())) == 10


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_search_is_close_to_exact_even_for_large_features(dtype, tol):
    gen = torch.Generator().manual_seed(7)
    bank = 1000 + 300 * torch.rand(500, 256, generator=gen)  # norms ~ 1.8e4: |x|^2 overflows float16
    queries = 1000 + 300 * torch.rand(300, 256, generator=gen)
    exact = knn(queries, bank, 2)[0]
    approx = knn_half(queries, half_bank(bank, dtype), 2)
    radius = (bank - bank.mean(0)).norm(dim=1).max()
    assert torch.isfinite(approx).all()
    assert ((approx - exact).abs() / radius).max() < tol


def test_half_dtype_names():
    assert [half_dtype(p) for p in PRECISIONS] == [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_coreset_triton_kernels_match_naive_in_the_interpreter():
    """The CUDA kernels, run by Triton's CPU interpreter (a subprocess: the mode is read at import)."""
    code = (
        "import torch, anomap.ops as ops\n"
        "class Bar:\n    def update(self, k): pass\n"
        "x = torch.randn(300, 20, generator=torch.Generator().manual_seed(3))\n"
        "got, done = ops._greedy_torch(x, 40, 7, Bar(), use_triton=True)\n"
        "print(done, *got.tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(3))
    assert int(out[0]) == 40
    assert [int(v) for v in out[1:]] == naive_greedy(x, 40, 7)


def test_cpu_coreset_keeps_torch_thread_count():
    """numba's parallel kernel once set the process's OpenMP thread count, and with it torch's, to
    numba's pool size, so OMP_NUM_THREADS=1 stopped holding after the first coreset."""
    code = (
        "import torch, anomap.ops as ops\n"
        "x = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))\n"
        "ops.greedy_coreset(x, 600, progress=False)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["1"]
