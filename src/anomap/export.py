"""Export a fitted detector as one self-contained graph: an ONNX file, or OpenVINO IR.

The graph holds the whole path from pixels to answers, built on the detector's own scoring
(`_score_batch`), so no method's maths is written twice:

    images (N, H, W, 3) uint8, resized to the model's input size (H = W = image_size)
    -> centre crop -> normalization -> backbone, embedding, search or reconstruction, map
    upsampling and blur -> scores (N,) float32, maps (N, S, S) float32, labels (N,) int64
    (1: score >= the stored threshold).

The file's metadata says what a caller needs (see `anomap.runtime.METADATA`). N is fixed when
exporting (`batch_size`, default 1): the chunked nearest-neighbour search (`ops.knn`) loops over
the queries in Python, which pins the number of images in the traced graph.

The graph always searches exactly and computes in float32: a PatchCore model set to an approximate
search (faiss, IVF) or to half-precision scoring is exported in its exact form. `precision="fp16"`
stores the weights and memory banks in float16 (half the file); runtimes widen them to float32 on
loading, so scores differ from fp32 by the rounding of the stored values only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from ._io import atomic_path
from .errors import ExportError, ParamError
from .runtime import EXPORT_FORMAT, EXPORT_VERSION, INPUT, OUTPUTS

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16")
# initializers above this many bytes in all go to an external data file next to the ONNX file:
# protobuf refuses messages of 2 GiB or more; the margin leaves room for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# float32 initializers of fewer elements (normalization constants, blur kernels) stay float32 in
# fp16 files: they are a negligible share of the file and keep the normalization exact
HALF_MIN_ELEMENTS = 1024


class ScoringGraph(nn.Module):
    """uint8 (N, H, W, 3) images resized to the input size -> scores (N,), maps (N, S, S), labels (N,).

    Crops and normalizes exactly as `Preprocess` does, then calls the detector's `_score_batch`.
    """

    def __init__(self, det) -> None:
        super().__init__()
        pre = det.preprocess_
        self.det, self.threshold = det, float(det.threshold_)
        self.box = None if pre.crop is None else pre.crop_box(pre.size, pre.size)
        shift, scale = pre.normalization()
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.box is not None:
            left, top, right, bottom = self.box
            images = images[:, top:bottom, left:right]
        x = (images.permute(0, 3, 1, 2).float() - self.shift) * self.scale  # (N, 3, S, S)
        scores, maps = self.det._score_batch(x)
        return scores, maps, (scores >= self.threshold).to(torch.int64)


def export(det, path: str | Path, *, format: str = "onnx", precision: str = "fp32", batch_size: int = 1) -> Path:
    """Export a fitted detector (see `export_file`). Its metadata names the SHA-256 of the model
    file `det.save` writes (model files are byte-reproducible). Returns the path written."""
    det._check_fitted()
    with tempfile.TemporaryDirectory(prefix="anomap-export-") as tmp:
        return export_file(
            det.save(Path(tmp) / "model.anomap"), path, format=format, precision=precision, batch_size=batch_size
        )


def export_file(
    model: str | Path,
    path: str | Path,
    *,
    format: str = "onnx",
    precision: str = "fp32",
    batch_size: int = 1,
    key: bytes | None = None,
) -> Path:
    """Export the model file `model` to `path`: an `.onnx` file (format "onnx", with `<name>.data`
    beside it for weights above 2 GB) or OpenVINO IR (format "openvino": `path` ending in `.xml`,
    with `<stem>.bin` beside it). Written atomically. Returns `path`. With `key`, `model` must be
    signed with it (`Detector.save(path, key=...)`).

        Raises:
            ModelFileError: `model` is missing, damaged, not an anomap model file, or not signed with `key`.
            ExportError: the model has no threshold, or its method cannot be expressed as a graph.
            ParamError: an unknown format or precision, a bad batch size or output name.
    """
    from .detectors import load

    path = _check_options(Path(path), format, precision, batch_size)
    _require("onnxscript", "onnx")
    if format == "openvino":
        _require("openvino", "openvino")
    det = load(model, device="cpu", key=key)
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    if det.threshold_ is None:
        raise ExportError(f"{model}: the model has no threshold; calibrate it before exporting")
    _exact_scoring(det)
    onnx_model = _trace(det, batch_size)
    onnx_model.metadata_props.update(metadata(det, digest, precision, batch_size))
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        if format == "onnx":
            if precision == "fp16":
                _store_half(onnx_model)
            built = _save_onnx(onnx_model, Path(tmp) / path.name)
        else:
            onnx_files = _save_onnx(onnx_model, Path(tmp) / "graph.onnx")
            built = _save_openvino(
                onnx_files, onnx_model.metadata_props, Path(tmp) / "ir" / path.name, half=precision == "fp16"
            )
        _move_into_place(built, path)
    return path


def _check_options(path: Path, format: str, precision: str, batch_size: int) -> Path:
    if format not in FORMATS:
        raise ParamError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if precision not in PRECISIONS:
        raise ParamError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1024:
        raise ParamError(f"batch_size must be an integer from 1 to 1024, got {batch_size!r}")
    suffix = ".onnx" if format == "onnx" else ".xml"
    if path.suffix.lower() != suffix:
        raise ParamError(f"{path}: a {format} export is written to a file ending in {suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"exporting needs the {module} package: pip install 'anomap[{extra}]'")


def metadata(det, source_sha256: str, precision: str, batch_size: int) -> dict[str, str]:
    """The exported file's metadata (str -> str; keys as in `anomap.runtime.METADATA`)."""
    pre = det.preprocess_
    return {
        "anomap_format": EXPORT_FORMAT,
        "format_version": str(EXPORT_VERSION),
        "anomap_version": __version__,
        "method": det.method,
        "input_size": str(pre.size),
        "crop": "" if pre.crop is None else str(pre.crop),
        "output_size": str(pre.output_size),
        "colour_mode": "RGB",
        "resize": pre.resize,
        "threshold": repr(float(det.threshold_)),
        "precision": precision,
        "batch_size": str(batch_size),
        "source_sha256": source_sha256,
        "normal_scores": json.dumps([float(v) for v in det.normal_scores_]),
        "params": json.dumps(det.get_params()),
    }


def _exact_scoring(det) -> None:
    """Set the scoring options a graph cannot hold to their exact forms, on this private copy:
    faiss searches (library calls, not graph operations) and half-precision scoring."""
    for d in (det, *getattr(det, "_members", {}).values()):  # an ensemble scores through its members
        if getattr(d, "search", "exact") != "exact":
            log.info("%s: the graph searches the memory bank exactly (the model uses search=%s)", d.method, d.search)
            d.search = "exact"
        if getattr(d, "precision", "fp32") != "fp32":
            d.precision = d.encoder_.precision = "fp32"


def _trace(det, batch_size: int):
    """The detector's scoring graph as an `onnx_ir.Model`."""
    graph = ScoringGraph(det).eval()
    side = det.preprocess_.size
    example = torch.zeros((batch_size, side, side, 3), dtype=torch.uint8)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT],
                output_names=list(OUTPUTS),
                custom_translation_table={torch.ops.aten.median.dim: _median_dim},
            )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; one line names the cause
        raise ExportError(f"method {det.method} cannot be exported as a graph: {_cause(err)}") from err
    return program.model


def _median_dim(self, dim: int, keepdim: bool = False):
    """aten.median.dim (torch's lower median, with its index) as ONNX TopK, which torch's exporter
    lacks (PSFE's reference="none" standardises by medians). The traced shapes are static."""
    from onnxscript import opset18 as op

    k = (self.shape[dim] + 1) // 2  # the lower median is the k-th smallest value
    values, indices = op.TopK(self, [k], axis=dim, largest=0, sorted=1)
    values, indices = (op.Slice(t, [k - 1], [k], [dim]) for t in (values, indices))
    if not keepdim:
        values, indices = (op.Squeeze(t, [dim]) for t in (values, indices))
    return values, indices


def _cause(err: BaseException) -> str:
    """One line on why the exporter failed: its summary of the innermost error when it gives one."""
    lines = str(err).strip().splitlines()
    summary = [line.split("'>: ", 1)[1] for line in lines if "Error'>: " in line]
    return (summary or lines or [type(err).__name__])[0][:300]


def _store_half(model) -> None:
    """Store float32 initializers of at least HALF_MIN_ELEMENTS elements as float16, each widened
    back to float32 by a Cast node."""
    import onnx_ir as ir

    graph = model.graph
    for name, value in list(graph.initializers.items()):
        array = value.const_value.numpy()
        if value.dtype != ir.DataType.FLOAT or array.size < HALF_MIN_ELEMENTS:
            continue
        half = array.astype(np.float16)
        if not np.isfinite(half).all():
            raise ExportError(f"weights of {name} exceed the float16 range; export with precision fp32")
        stored = ir.Value(
            name=f"{name}_fp16",
            shape=value.shape,
            type=ir.TensorType(ir.DataType.FLOAT16),
            const_value=ir.tensor(half, name=f"{name}_fp16"),
        )
        graph.register_initializer(stored)
        cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{name}_widen")
        value.replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = name
        del graph.initializers[name]
        graph.insert_before(graph.node(0), cast)


def _save_onnx(model, path: Path) -> list[Path]:
    """Write the model (with external data above EXTERNAL_DATA_BYTES); return the files, main file last."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size <= EXTERNAL_DATA_BYTES:
        ir.save(model, path)
        return [path]
    data = path.with_name(path.name + ".data")
    ir.save(model, path, external_data=data.name)
    return [data, path]


def _save_openvino(onnx_files: list[Path], meta: dict[str, str], xml: Path, half: bool) -> list[Path]:
    """Convert the ONNX file to OpenVINO IR with the same metadata, storing the weights in float16
    when `half` (OpenVINO's own compression: float16 constants widened to float32 on loading);
    return [bin, xml]."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_files[-1]))
    except Exception as err:  # noqa: BLE001 - OpenVINO raises its own error types
        raise ExportError(f"OpenVINO cannot convert the graph: {_cause(err)}") from err
    for key, value in meta.items():
        model.set_rt_info(value, ["anomap", key])
    # CPUs with bf16 units would otherwise compute in bfloat16: too coarse for distances
    model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    xml.parent.mkdir()
    ov.save_model(model, str(xml), compress_to_fp16=half)
    return [xml.with_suffix(".bin"), xml]


def _move_into_place(files: list[Path], path: Path) -> None:
    """Move the built files next to `path`, the main file (last) after its companions, each by an
    atomic rename: a reader sees the old main file or the new one, never a partial one."""
    for built in files:
        with atomic_path(path.with_name(built.name)) as tmp:
            os.replace(built, tmp)
