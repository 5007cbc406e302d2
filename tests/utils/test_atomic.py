"""up2.utils.atomic: written files get the normal mode of new files, and JSON is strict."""
import json
import math
import os
import stat

import numpy as np
import pytest

from up2.utils.atomic import atomic_write, to_strict_json, write_json_atomic


@pytest.fixture
def umask():
    """``os.umask`` for one test; the process umask is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_get_0666_minus_umask(tmp_path, umask):
    umask(0o022)
    with atomic_write(str(tmp_path / "a.bin"), "wb") as f:
        f.write(b"x")
    write_json_atomic({"a": 1}, str(tmp_path / "sub" / "r.json"))
    assert _mode(tmp_path / "a.bin") == 0o644 and _mode(tmp_path / "sub" / "r.json") == 0o644
    umask(0o077)
    write_json_atomic({"a": 1}, str(tmp_path / "private.json"))
    assert _mode(tmp_path / "private.json") == 0o600
    umask(0o022)
    os.chmod(tmp_path / "private.json", 0o640)  # an existing file keeps its mode, as with open(path, "w")
    write_json_atomic({"a": 2}, str(tmp_path / "private.json"))
    assert _mode(tmp_path / "private.json") == 0o640
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "private.json", "sub"]  # no temp files left


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_inf_become_null_and_parse_strictly(tmp_path):
    obj = {"ap": float("nan"), "rows": [1.5, float("inf"), -math.inf], "np": np.float32("nan"),
           "arr": np.array([0.5, np.nan]), "n": np.int64(3), "t": (1, 2), "ok": True, "s": "NaN"}
    path = tmp_path / "metrics.json"
    write_json_atomic(obj, str(path))
    text = path.read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert _strict_loads(text) == {"ap": None, "rows": [1.5, None, None], "np": None, "arr": [0.5, None],
                                   "n": 3, "t": [1, 2], "ok": True, "s": "NaN"}
    assert obj["rows"][1] == float("inf")  # the input is not modified
    assert to_strict_json([float("nan")]) == [None]


def test_unwritable_object_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, str(path))
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, str(path))
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(str(path), "a"):
            pass
