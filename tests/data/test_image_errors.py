"""Errors while reading or mapping one image name the file: PIL's pixel limit (error and warning),
a record size that is the EXIF-unrotated one, and any other failure inside the mappers."""
import warnings

import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image

from up2.data.image_io import ImageTooLargeError, apply_max_image_pixels_from_env, check_image_size, read_image
from up2.data.mappers import ClassificationDatasetMapper, DetectionDatasetMapper, ImageTextDatasetMapper


@pytest.fixture
def small_png(tmp_path):
    path = tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)).save(path)  # 20 x 10 = 200 pixels
    return path


def test_beyond_twice_the_pixel_limit_names_file_size_and_limit(small_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 200 > 2 * 50
    with pytest.raises(ImageTooLargeError) as info:
        read_image(small_png)
    msg = str(info.value)
    assert str(small_png) in msg and "200 pixels" in msg and "MAX_IMAGE_PIXELS = 50" in msg
    assert "UP2_MAX_IMAGE_PIXELS" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, Image.DecompressionBombError)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_beyond_the_pixel_limit_warns_naming_the_file(small_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 150 < 200 <= 300: PIL decodes and warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(small_png)
    assert out.shape == (10, 20, 3)
    bombs = [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    named = [m for m in bombs if str(small_png) in m]  # PIL's own warning comes first, without the file
    assert len(bombs) == 2 and named == bombs[1:], bombs
    assert "20 x 10 = 200 pixels" in named[0] and "MAX_IMAGE_PIXELS = 150" in named[0]
    with warnings.catch_warnings():  # warnings as errors (python -W error): the error names the file
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning, match="small.png: Image size .200 pixels.") as info:
            read_image(small_png)
    assert "UP2_MAX_IMAGE_PIXELS" in str(info.value) and info.value.__cause__ is not None


def test_pixel_limit_from_the_environment(monkeypatch, small_png):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    monkeypatch.setenv("UP2_MAX_IMAGE_PIXELS", "1000")
    assert apply_max_image_pixels_from_env() == 1000 and Image.MAX_IMAGE_PIXELS == 1000
    assert read_image(small_png).shape == (10, 20, 3)
    monkeypatch.setenv("UP2_MAX_IMAGE_PIXELS", "None")
    assert apply_max_image_pixels_from_env() is None
    for bad in ("-5", "0", "lots"):
        monkeypatch.setenv("UP2_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ValueError, match=rf"UP2_MAX_IMAGE_PIXELS='{bad}': expected a positive number"):
            apply_max_image_pixels_from_env()
    assert Image.MAX_IMAGE_PIXELS is None  # a bad value changes nothing
    monkeypatch.delenv("UP2_MAX_IMAGE_PIXELS")
    assert apply_max_image_pixels_from_env() is None


@pytest.fixture
def rotated_jpeg(tmp_path):
    """Stored 40 x 20 (W x H) pixels with EXIF orientation 6: displayed 20 wide, 40 high."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    return path


def test_exif_rotated_size_mismatch_names_file_sizes_and_exif(rotated_jpeg):
    assert read_image(rotated_jpeg).shape == (40, 20, 3)
    record = {"file_name": str(rotated_jpeg), "image_id": 1, "height": 20, "width": 40, "annotations": []}
    cases = [
        DetectionDatasetMapper(True, augmentations=[]),
        ClassificationDatasetMapper(False, augmentations=[]),
        ImageTextDatasetMapper(False, augmentations=[]),
    ]
    for mapper in cases:
        with pytest.raises(SizeMismatchError) as info:
            mapper({**record, "class_id": 0, "captions": ["a photo"]})
        msg = str(info.value)
        assert str(rotated_jpeg) in msg, type(mapper).__name__
        assert "height=20, width=40" in msg and "height 40, width 20" in msg
        assert "are swapped" in msg and "EXIF orientation 6" in msg
    ok = DetectionDatasetMapper(True, augmentations=[])({**record, "height": 40, "width": 20})
    assert ok["image"].shape == (3, 40, 20)


def test_swapped_size_without_exif_says_there_is_none(small_png):
    with pytest.raises(SizeMismatchError, match=r"swapped.*no 90-degree rotation: check the record"):
        check_image_size({"file_name": str(small_png), "height": 20, "width": 10}, (10, 20))
    with pytest.raises(SizeMismatchError) as info:
        check_image_size({"file_name": str(small_png), "height": 11}, (10, 20))
    assert str(small_png) in str(info.value) and "are swapped" not in str(info.value)
    check_image_size({"file_name": str(small_png), "width": 20}, (10, 20))  # only what the record has


class _Boom(T.Augmentation):
    """An augmentation that fails the way a buggy transform would, without the file name."""

    def get_transform(self, image):
        raise IndexError("index 7 is out of bounds")


class _Odd(Exception):
    def __init__(self, code, detail):  # not constructible from one message
        super().__init__(code, detail)


class _OddAug(T.Augmentation):
    def get_transform(self, image):
        raise _Odd(3, "odd")


def test_any_failure_while_mapping_names_the_file(small_png):
    record = {"file_name": str(small_png), "image_id": 0, "class_id": 0, "captions": ["x"], "annotations": []}
    for cls in (DetectionDatasetMapper, ClassificationDatasetMapper, ImageTextDatasetMapper):
        with pytest.raises(IndexError) as info:
            cls(True, augmentations=[_Boom()])(dict(record))
        assert str(info.value).startswith(f"record of {small_png}: IndexError: index 7"), cls.__name__
        assert isinstance(info.value.__cause__, IndexError) and "index 7" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match=f"record of {small_png}: _Odd") as info:
        ClassificationDatasetMapper(True, augmentations=[_OddAug()])(dict(record))
    assert isinstance(info.value.__cause__, _Odd)
    # an error that already names the file passes unchanged (same object, no prefix)
    with pytest.raises(FileNotFoundError, match=r"^image file not found: .*gone\.png$"):
        DetectionDatasetMapper(True, augmentations=[])(dict(record, file_name=str(small_png.parent / "gone.png")))

