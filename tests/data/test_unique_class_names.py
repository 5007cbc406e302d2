"""Class names are distinct text targets: ImageNet-1k's shared first lemmas ("crane", "maillot")
are disambiguated deterministically; names used once never change."""
import csv
import io
import pkgutil

import pytest

from up2.data.datasets.builtin import imagenet_1k_classes
from up2.data.datasets.imagenet import read_class_names, unique_class_names


def _first_lemmas():
    """wnid -> first lemma, straight from timm's table (independent of up2's code)."""
    pytest.importorskip("timm")
    data = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode("utf-8")
    return {w: lemma.split(",")[0].strip() for w, lemma in csv.reader(io.StringIO(data), delimiter="\t")}


def test_imagenet_1k_names_are_unique_and_otherwise_unchanged():
    first = _first_lemmas()
    wnids, names = imagenet_1k_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    raw = [first[w] for w in wnids]
    assert len(set(raw)) == 998  # the table itself: "crane" twice, "maillot" twice
    shared = {n for n in raw if raw.count(n) > 1}
    assert shared == {"crane", "maillot"}
    for w, r, n in zip(wnids, raw, names):
        if r not in shared:
            assert n == r, w
    by_wnid = dict(zip(wnids, names))
    assert by_wnid["n02012849"] == "crane (bird)" and by_wnid["n03126707"] == "crane (machine)"
    assert by_wnid["n03710637"] == "maillot" and by_wnid["n03710721"] == "tank suit"
    assert imagenet_1k_classes() == (wnids, names)  # deterministic


def test_unique_class_names_rules():
    assert unique_class_names(["a", "b", "c"]) == ["a", "b", "c"]
    # a free alternative is taken; the one member left keeps the plain name
    assert unique_class_names(["m", "m", "t"], alternatives=[[], ["t", "u"], []]) == ["m", "u", "t"]
    # several left: hints, then the class index when the hint is missing or already used
    assert unique_class_names(["c", "x", "c", "c"], hints=["bird", "", "machine", "bird"]) == [
        "c (bird)", "x", "c (machine)", "c (class 3)"]
    assert unique_class_names(["c", "c"]) == ["c (class 0)", "c (class 1)"]
    with pytest.raises(ValueError, match="hints has 1 entries for 2 class names"):
        unique_class_names(["c", "c"], hints=["h"])


def test_read_class_names_disambiguates_shared_names_with_the_folder(tmp_path, caplog):
    for w in ("n01", "n02", "n03"):
        (tmp_path / "root" / w).mkdir(parents=True)
    names_file = tmp_path / "names.txt"
    names_file.write_text("n01 crane\nn02 tench\nn03 crane\n")
    with caplog.at_level("WARNING"):
        names = read_class_names(str(tmp_path / "root"), str(names_file))
    assert names == ["crane (n01)", "tench", "crane (n03)"]
    assert "made unique" in caplog.text and "'crane' -> 'crane (n01)'" in caplog.text
