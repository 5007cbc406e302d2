"""read_image / to_rgb_array: every PIL mode, EXIF orientation, errors naming the path."""
import numpy as np
import pytest
from PIL import Image

from up2.data.image_io import read_image, to_rgb_array


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)


def _save(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _over_white(color, alpha):
    a = alpha.astype(np.float64)[..., None] / 255.0
    return color.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_rgb_and_bgr(tmp_path, rgb):
    path = _save(tmp_path, Image.fromarray(rgb), "x.png")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (16, 24, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(read_image(str(path), format="BGR"), rgb[:, :, ::-1])


def test_grayscale_and_bilevel(tmp_path, rgb):
    gray = rgb[:, :, 0]
    out = read_image(_save(tmp_path, Image.fromarray(gray, mode="L"), "l.png"))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    bits = gray > 127
    out = read_image(_save(tmp_path, Image.fromarray(bits), "one.png"))
    np.testing.assert_array_equal(out, np.repeat(bits[:, :, None], 3, axis=2).astype(np.uint8) * 255)


def test_alpha_composited_on_white(tmp_path, rgb):
    alpha = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))
    rgba = np.concatenate([rgb, alpha[:, :, None]], axis=2)
    out = read_image(_save(tmp_path, Image.fromarray(rgba, mode="RGBA"), "rgba.png"))
    np.testing.assert_allclose(out.astype(np.float64), _over_white(rgb, alpha), atol=1.0)
    assert (out[:, 0] == 255).all()  # alpha 0 -> white
    la = np.stack([rgb[:, :, 1], alpha], axis=2)
    out = read_image(_save(tmp_path, Image.fromarray(la, mode="LA"), "la.png"))
    np.testing.assert_allclose(out[:, :, 0].astype(np.float64), _over_white(rgb[:, :, 1:2], alpha)[:, :, 0], atol=1.0)


def test_palette_with_and_without_transparency(tmp_path, rgb):
    pal = Image.fromarray(rgb).quantize(colors=16)
    out = read_image(_save(tmp_path, pal, "p.png"))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    index = np.asarray(pal)
    out = read_image(_save(tmp_path, pal, "pt.png", transparency=int(index[0, 0])))
    transparent = index == index[0, 0]
    assert (out[transparent] == 255).all()
    np.testing.assert_array_equal(out[~transparent], np.asarray(pal.convert("RGB"))[~transparent])


def test_cmyk(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 128, (8, 10, 4), dtype=np.uint8)
    out = read_image(_save(tmp_path, Image.fromarray(cmyk, mode="CMYK"), "c.tif"))
    # subtractive model: R = (255 - C) * (255 - K) / 255 (Pillow's formula; older Pillow used a
    # clipped 255 - C - K, so allow either)
    c, k = cmyk[:, :, :3].astype(float), cmyk[:, :, 3:].astype(float)
    multiplicative = (255 - c) * (255 - k) / 255
    additive = np.clip(255 - c - k, 0, 255)
    diff = np.minimum(np.abs(out - multiplicative), np.abs(out - additive))
    assert diff.max() <= 0.5 + 1e-6


def test_sixteen_bit(tmp_path):
    values = np.arange(0, 65536, 65536 // 120, dtype=np.uint16)[:120].reshape(10, 12)
    values[0, 0], values[-1, -1] = 0, 65535
    out = read_image(_save(tmp_path, Image.fromarray(values), "i16.png"))
    np.testing.assert_array_equal(out, np.repeat((values // 257)[:, :, None], 3, axis=2).astype(np.uint8))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    out = read_image(_save(tmp_path, Image.fromarray(values.astype(np.int32), mode="I"), "i32.tif"))
    np.testing.assert_array_equal(out[:, :, 2], (values // 257).astype(np.uint8))


def test_exif_orientation_applied(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 255  # right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, Image.fromarray(img), "rot.jpg", exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (30, 20, 3)
    expected = np.rot90(img, k=-1)  # clockwise: the left (black) half goes to the top
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 8
    assert out[:10].mean() < 30 and out[-10:].mean() > 225


def test_missing_and_corrupt_files(tmp_path, rgb):
    missing = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_image(missing)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=str(bad)):
        read_image(bad)
    good = _save(tmp_path, Image.fromarray(rgb), "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=str(truncated)):
        read_image(truncated)
    with pytest.raises(ValueError, match="format"):
        read_image(good, format="YUV")


def test_to_rgb_array(rgb):
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    np.testing.assert_array_equal(to_rgb_array(bgr), rgb)  # numpy input is BGR by default
    np.testing.assert_array_equal(to_rgb_array(rgb, input_format="RGB"), rgb)
    np.testing.assert_array_equal(to_rgb_array(rgb, format="BGR", input_format="RGB"), bgr)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(to_rgb_array(gray), np.repeat(gray[:, :, None], 3, 2))
    np.testing.assert_array_equal(to_rgb_array(gray[:, :, None]), np.repeat(gray[:, :, None], 3, 2))
    alpha = np.full(gray.shape, 128, np.uint8)
    bgra = np.concatenate([bgr, alpha[:, :, None]], axis=2)
    np.testing.assert_allclose(to_rgb_array(bgra).astype(float), _over_white(rgb, alpha), atol=1.0)
    np.testing.assert_array_equal(to_rgb_array(rgb.astype(np.float32) / 255.0, input_format="RGB"), rgb)
    np.testing.assert_array_equal(to_rgb_array((gray.astype(np.uint16) * 257)), np.repeat(gray[:, :, None], 3, 2))
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(rgb)), rgb)
    out = to_rgb_array(bgr)
    out[:] = 0
    assert bgr.any()  # input untouched


def test_to_rgb_array_errors(rgb):
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        to_rgb_array(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_array(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(TypeError, match="list"):
        to_rgb_array([[0, 1]])
