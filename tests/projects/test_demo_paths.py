"""projects/demo/demo.py never overwrites an input or another drawing of the same run."""
import pytest

from projects.demo.demo import drawing_paths


def test_drawings_are_named_after_the_inputs(tmp_path):
    assert drawing_paths([str(tmp_path / "a.jpg"), "b.png"], "out") == ["out/a.png", "out/b.png"]


def test_a_drawing_that_would_overwrite_its_input_is_refused(tmp_path):
    photo = tmp_path / "self.png"
    photo.write_bytes(b"")
    with pytest.raises(ValueError, match=r"would overwrite the input .*self.png"):
        drawing_paths([str(photo)], str(tmp_path))


def test_two_inputs_with_one_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"a/x.png and b/x.jpg would both be drawn to"):
        drawing_paths(["a/x.png", "b/x.jpg"], str(tmp_path))
