import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.data import (
    ImageFolder,
    MVTecAD,
    Preprocess,
    Sample,
    categories,
    describe,
    image_size,
    iter_batches,
    list_images,
    load_image,
    load_mask,
    load_masks,
)
from anomap.errors import DataError


def _save(path: Path, pixels, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels), mode)
    img.save(path, **kw)
    return path


def _rgb(value: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _square_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[rows, cols] = 255
    return mask


def _category(root: Path, masks: bool = True) -> Path:
    """cat/ with 2 train images, 1 good test image and crack images x.png, x_1.jpg.

    The masks sort in the opposite order to their images (x_1_mask < x_mask, x.png < x_1.jpg).
    """
    cat = root / "cat"
    for name in ("000.png", "001.png"):
        _save(cat / "train" / "good" / name, _rgb(10))
    _save(cat / "test" / "good" / "000.png", _rgb(20))
    _save(cat / "test" / "crack" / "x.png", _rgb(30))
    _save(cat / "test" / "crack" / "x_1.jpg", _rgb(40))
    if masks:
        _save(cat / "ground_truth" / "crack" / "x_mask.png", _square_mask(16, 16, slice(0, 8), slice(0, 8)))
        _save(cat / "ground_truth" / "crack" / "x_1_mask.png", _square_mask(16, 16, slice(8, 16), slice(8, 16)))
    return cat


def test_mvtec_pairs_masks_by_stem_not_by_order(tmp_path):
    cat = _category(tmp_path)
    data = MVTecAD(tmp_path, "cat")
    assert data.has_masks and data.category == "cat" and data.root == tmp_path
    assert [s.path.name for s in data.train] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in data.train)
    by_name = {s.path.name: s for s in data.test}
    assert [s.path.name for s in data.test] == ["x.png", "x_1.jpg", "000.png"]  # sorted defect folders
    assert by_name["x.png"].mask_path == cat / "ground_truth" / "crack" / "x_mask.png"
    assert by_name["x_1.jpg"].mask_path == cat / "ground_truth" / "crack" / "x_1_mask.png"
    assert by_name["000.png"] == Sample(cat / "test" / "good" / "000.png", 0, "good", None)
    masks = load_masks(data.test, Preprocess(size=16))
    assert masks[0, :8, :8].all() and masks[0].sum() == 64
    assert masks[1, 8:, 8:].all() and masks[1].sum() == 64
    assert not masks[2].any()


def test_mvtec_missing_mask_names_image_and_expected_mask(tmp_path):
    cat = _category(tmp_path)
    (cat / "ground_truth" / "crack" / "x_1_mask.png").unlink()
    with pytest.raises(DataError, match="x_1.jpg") as err:
        MVTecAD(tmp_path, "cat")
    assert "x_1_mask.png" in str(err.value)


def test_mvtec_extra_mask_is_an_error(tmp_path):
    cat = _category(tmp_path)
    _save(cat / "ground_truth" / "crack" / "y_mask.png", _square_mask(16, 16, slice(0, 2), slice(0, 2)))
    with pytest.raises(DataError, match="y_mask.png"):
        MVTecAD(tmp_path, "cat")


def test_mvtec_masks_for_a_defect_without_test_folder(tmp_path):
    cat = _category(tmp_path)
    _save(cat / "ground_truth" / "hole" / "z_mask.png", _square_mask(16, 16, slice(0, 2), slice(0, 2)))
    with pytest.raises(DataError, match="z_mask.png"):
        MVTecAD(tmp_path, "cat")


def test_mvtec_without_ground_truth_has_no_masks(tmp_path):
    _category(tmp_path, masks=False)
    data = MVTecAD(tmp_path, "cat")
    assert not data.has_masks
    assert [(s.label, s.mask_path) for s in data.test] == [(1, None), (1, None), (0, None)]
    assert describe(data.test) == {
        "total": 3,
        "normal": 1,
        "anomalous": 2,
        "with_mask": 0,
        "defects": {"crack": 2, "good": 1},
    }


def test_mvtec_ignores_hidden_and_non_image_files(tmp_path):
    cat = _category(tmp_path)
    good = cat / "train" / "good"
    (good / "._000.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (good / "notes.txt").write_text("not an image")
    _save(good / "UPPER.PNG", _rgb(5))
    _save(good / "photo.JPEG", _rgb(5), format="JPEG")
    _save(cat / "test" / ".cache" / "a.png", _rgb(5))
    data = MVTecAD(tmp_path, "cat")
    assert [s.path.name for s in data.train] == ["000.png", "001.png", "UPPER.PNG", "photo.JPEG"]
    assert {s.defect for s in data.test} == {"crack", "good"}


@pytest.mark.parametrize("breakage", ["root", "category", "train", "empty_train"])
def test_mvtec_missing_folders(tmp_path, breakage):
    cat = _category(tmp_path)
    root, category = tmp_path, "cat"
    if breakage == "root":
        root = tmp_path / "nowhere"
    elif breakage == "category":
        category = "bottle"
    else:
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
        if breakage == "train":
            (cat / "train" / "good").rmdir()
    with pytest.raises(DataError, match="nowhere|bottle|train"):
        MVTecAD(root, category)


def test_categories(tmp_path):
    for name in ("b_cat", "a_cat", ".hidden"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "no_train" / "test").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    assert categories(tmp_path) == ["a_cat", "b_cat"]
    with pytest.raises(DataError, match="missing"):
        categories(tmp_path / "missing")


def test_image_folder_with_both_mask_names(tmp_path):
    for name in ("n1.png", "n0.png"):
        _save(tmp_path / "ok" / name, _rgb(1))
    for name in ("a.png", "b.bmp"):
        _save(tmp_path / "scratch" / name, _rgb(2))
    _save(tmp_path / "gt" / "a_mask.png", _square_mask(16, 16, slice(0, 1), slice(0, 1)))
    _save(tmp_path / "gt" / "b.png", _square_mask(16, 16, slice(0, 1), slice(0, 1)))
    data = ImageFolder(good=tmp_path / "ok", anomalous=tmp_path / "scratch", masks=tmp_path / "gt")
    got = [(s.path.name, s.label, s.defect, s.mask_path and s.mask_path.name) for s in data.samples]
    assert got == [
        ("n0.png", 0, "good", None),
        ("n1.png", 0, "good", None),
        ("a.png", 1, "scratch", "a_mask.png"),
        ("b.bmp", 1, "scratch", "b.png"),
    ]
    assert [s.label for s in ImageFolder(anomalous=tmp_path / "scratch").samples] == [1, 1]
    _save(tmp_path / "gt" / "c_mask.png", _square_mask(16, 16, slice(0, 1), slice(0, 1)))
    with pytest.raises(DataError, match="c_mask.png"):
        ImageFolder(anomalous=tmp_path / "scratch", masks=tmp_path / "gt")
    (tmp_path / "gt" / "c_mask.png").unlink()
    (tmp_path / "gt" / "b.png").unlink()
    with pytest.raises(DataError, match="b.bmp"):
        ImageFolder(anomalous=tmp_path / "scratch", masks=tmp_path / "gt")


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _save(tmp_path / "empty" / "sub" / "a.png", _rgb(1))
    with pytest.raises(DataError, match="empty"):
        ImageFolder(good=tmp_path / "empty")
    with pytest.raises(DataError, match="absent"):
        ImageFolder(anomalous=tmp_path / "absent")
    with pytest.raises(DataError):
        ImageFolder()


def test_list_images_files_and_folders(tmp_path):
    _save(tmp_path / "d" / "b.png", _rgb(1))
    _save(tmp_path / "d" / "a" / "z.jpg", _rgb(1))
    _save(tmp_path / "d" / ".hidden" / "h.png", _rgb(1))
    (tmp_path / "d" / "readme.md").write_text("x")
    (tmp_path / "d" / "a" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "self.png").symlink_to(tmp_path / "d" / "self.png")
    single = _save(tmp_path / "single.dat", _rgb(1), format="PNG")
    got = list_images([single, str(tmp_path / "d"), tmp_path / "d" / "b.png"])
    assert got == [single, tmp_path / "d" / "a" / "z.jpg", tmp_path / "d" / "b.png"]
    assert list_images(tmp_path / "d") == got[1:]
    with pytest.raises(DataError, match="nothing_here"):
        list_images([tmp_path / "d", tmp_path / "nothing_here"])
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images([tmp_path / "e"])


def test_load_image_grayscale_palette_cmyk(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert (load_image(_save(tmp_path / "g.png", grey)) == grey[:, :, None]).all()
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 250, 20, 10] + [0] * 762)
    pal.putpixel((3, 2), 1)
    rgb = load_image(_save(tmp_path / "p.png", pal))
    assert tuple(rgb[2, 3]) == (250, 20, 10) and tuple(rgb[0, 0]) == (0, 0, 0)
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    assert (load_image(_save(tmp_path / "c.tif", cmyk)) == (0, 255, 255)).all()
    jpeg = load_image(_save(tmp_path / "c.jpg", cmyk, quality=95)).astype(int)
    assert np.abs(jpeg - (0, 255, 255)).max() <= 3


def test_load_image_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3], rgba[1, :, 3], rgba[2:, :, 3] = 255, 128, 0
    rgb = load_image(_save(tmp_path / "a.png", rgba))
    assert tuple(rgb[0, 0]) == (200, 100, 50) and tuple(rgb[1, 0]) == (100, 50, 25)
    assert not rgb[2:].any()
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 90, 90, 90] + [0] * 762)
    pal.putpixel((0, 0), 0)
    rgb = load_image(_save(tmp_path / "pt.png", pal, transparency=1))
    assert not rgb.any()


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_load_image_16_bit_is_scaled(tmp_path, suffix):
    values = np.array([[0, 257 * 100, 65535, 128]], np.uint16).repeat(8, 0).repeat(2, 1)
    path = _save(tmp_path / f"d.{suffix}", Image.fromarray(values))
    rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    assert list(rgb[0, ::2, 1]) == [0, 100, 255, 0]


def test_load_image_applies_exif_orientation(tmp_path):
    stored = _rgb(0, h=20, w=40)
    stored[:10, :10] = (255, 0, 0)  # red top-left corner as stored
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed after a 90 degree clockwise turn
    path = _save(tmp_path / "r.jpg", img, exif=exif.tobytes(), quality=95)
    rgb = load_image(path)
    assert rgb.shape == (40, 20, 3) and image_size(path) == (40, 20)
    assert rgb[2:8, -8:-2, 0].min() > 200 and rgb[-8:, :8, 0].max() < 50  # now top-right


def test_content_decides_the_format(tmp_path):
    path = _save(tmp_path / "really_png.jpg", _rgb(77), format="PNG")
    assert (load_image(path) == 77).all()


def _bad_images(tmp_path: Path) -> dict[str, Path]:
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(png, "PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    _save(tmp_path / "tiny.png", _rgb(1, h=1, w=1))
    _save(tmp_path / "narrow.png", _rgb(1, h=100, w=7))
    return {p.stem: p for p in tmp_path.iterdir()} | {"missing": tmp_path / "missing.png"}


@pytest.mark.parametrize("case", ["truncated", "empty", "text", "folder", "tiny", "narrow", "missing"])
def test_bad_images_raise_data_error_naming_the_file(tmp_path, case):
    path = _bad_images(tmp_path)[case]
    with pytest.raises(DataError, match=path.name):
        load_image(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = _save(tmp_path / "locked.png", _rgb(1))
    real_open = open

    def deny(file, *args, **kw):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(DataError, match="locked.png.*permission"):
        load_image(path)


@pytest.mark.parametrize("pixels", [1000, 500])  # PIL warns above the limit, refuses above twice it
def test_decompression_bomb(tmp_path, monkeypatch, pixels):
    path = _save(tmp_path / "bomb.png", _rgb(1, h=40, w=40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(DataError, match="bomb.png.*too large"):
        load_image(path)


@pytest.mark.parametrize("pixels", [np.uint8(255), np.uint8(1), np.uint8(3), np.uint16(65535)])
def test_load_mask_any_non_zero_is_anomalous(tmp_path, pixels):
    values = _square_mask(10, 12, slice(2, 5), slice(3, 9)).astype(pixels.dtype) // 255 * pixels
    mask = load_mask(_save(tmp_path / "m.png", Image.fromarray(values)))
    assert mask.dtype == bool and mask.shape == (10, 12)
    assert mask.sum() == 18 and mask[2:5, 3:9].all()


def test_load_masks_size_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "i.png", _rgb(1, h=16, w=16))
    mask = _save(tmp_path / "i_mask.png", _square_mask(16, 20, slice(0, 1), slice(0, 1)))
    with pytest.raises(DataError, match="i_mask.png.*i.png"):
        load_masks([Sample(image, 1, "crack", mask)], Preprocess(size=8))
    assert load_masks([], Preprocess(size=8)).shape == (0, 8, 8)


def test_preprocess_mixed_sizes_and_normalisation():
    pre = Preprocess(size=32, crop=24)
    for h, w in [(16, 16), (40, 100), (300, 50)]:
        assert pre.image(_rgb(255, h, w)).shape == (3, 24, 24)
    out = Preprocess(size=8, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25)).image(_rgb(255, 20, 30))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))
    shorter = Preprocess(size=32, crop=16, resize="shorter")
    assert shorter.output_size == 16 and shorter.image(_rgb(9, 40, 100)).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize="shorter")
    rebuilt = Preprocess(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert rebuilt == Preprocess() and hash(rebuilt) == hash(Preprocess())


@pytest.mark.parametrize(
    "pre, shape, rows, cols",
    [
        (Preprocess(size=40), (80, 80), (10, 20), (20, 30)),
        (Preprocess(size=40, crop=20), (80, 80), (0, 10), (10, 20)),
        (Preprocess(size=40, crop=40, resize="shorter"), (80, 160), (10, 20), (20, 30)),
    ],
)
def test_mask_resize_stays_binary_and_aligned_with_image(pre, shape, rows, cols):
    h, w = shape
    # square at rows 20..39 and, in the wide case, shifted right by the 40 px that the crop removes
    col0 = 40 + (w - h) // 2
    mask = _square_mask(h, w, slice(20, 40), slice(col0, col0 + 20)) > 0
    out = pre.mask(mask)
    expected = np.zeros((pre.output_size,) * 2, bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert out.dtype == bool and (out == expected).all()
    image = pre.image(np.repeat(mask[:, :, None] * np.uint8(255), 3, axis=2))[0].numpy()
    assert image[out].min() > image[~out].max()
    line = np.zeros((80, 80), bool)
    line[:, 41] = True  # nearest neighbour samples source pixel 41 for output pixel 20
    assert (Preprocess(size=40).mask(line) == (np.arange(40) == 20)).all()
    odd = Preprocess(size=37).mask(mask)
    assert odd.dtype == bool and abs(odd.sum() - mask.sum() * 37**2 / mask.size) < 40


def test_iter_batches_order_sizes_and_mixed_inputs(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", _rgb(10 * i, h=12 + i, w=20)) for i in range(4)]
    items = [paths[0], str(paths[1]), Sample(paths[2], 0, "good", None), load_image(paths[3]), _rgb(40)]
    pre = Preprocess(size=8, mean=(0, 0, 0), std=(1, 1, 1))
    batches = list(iter_batches(items, pre, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    means = torch.cat(batches).mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(means, torch.tensor([0.0, 10, 20, 30, 40]), atol=1e-3)
    assert list(iter_batches([], pre)) == []


def test_iter_batches_errors_and_early_stop(tmp_path):
    pre = Preprocess(size=8)
    good = _save(tmp_path / "ok.png", _rgb(1))
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(DataError, match="bad.png"):
        list(iter_batches([good, good, bad], pre, batch_size=2))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        iter_batches([good, 3], pre)
    stream = iter_batches([good] * 50, pre, batch_size=1)
    assert next(stream).shape == (1, 3, 8, 8)
    stream.close()


def test_iter_batches_tensor_passthrough():
    data = torch.randn(5, 3, 8, 8)
    batches = list(iter_batches(data, Preprocess(size=8), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat(batches), data) and batches[0].data_ptr() == data.data_ptr()
    with pytest.raises(ValueError, match="3, 8, 8"):
        iter_batches(torch.randn(2, 3, 16, 16), Preprocess(size=8))


def test_symlink_loop_in_test_folder_does_not_hang(tmp_path):
    cat = _category(tmp_path)
    os.symlink(cat / "test", cat / "test" / "loop")
    data = MVTecAD(tmp_path, "cat")
    assert len(data.test) == 3
