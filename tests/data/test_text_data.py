"""Text corpora (empty lines, errors, re-registration), shapes text registration, TextDatasetMapper."""
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from up2.data.datasets import generate_shapes_dataset, load_text_corpus, register_shapes_tasks, register_text_corpus
from up2.data.mappers import TextDatasetMapper


def test_corpus_skips_empty_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("first doc.\n\n   \n  second  doc \r\nthird – ünïcode\n\n".encode("utf-8"))
    register_text_corpus("test_corpus", str(path))
    meta = MetadataCatalog.get("test_corpus")
    assert meta.evaluator_type == "mlm" and meta.corpus_file == str(path)
    recs = DatasetCatalog.get("test_corpus")
    assert recs == [
        {"text": "first doc.", "doc_id": 0},
        {"text": "second  doc", "doc_id": 1},
        {"text": "third – ünïcode", "doc_id": 2},
    ]
    other = tmp_path / "other.txt"
    other.write_text("only one\n")
    register_text_corpus("test_corpus", str(other))  # re-registering replaces
    assert DatasetCatalog.get("test_corpus") == [{"text": "only one", "doc_id": 0}]


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        register_text_corpus("test_corpus_missing", str(tmp_path / "missing.txt"))
    assert "test_corpus_missing" not in DatasetCatalog.list()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        register_text_corpus("test_corpus_empty", str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    register_text_corpus("test_corpus_blank", str(blank))  # non-zero size: found out when loaded
    with pytest.raises(ValueError, match=r"blank\.txt has no non-empty line"):
        DatasetCatalog.get("test_corpus_blank")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 2: not valid UTF-8"):
        load_text_corpus(str(bad))
    with pytest.raises(ValueError, match="non-empty str"):
        register_text_corpus("", str(bad))


def test_text_mapper():
    mapper = TextDatasetMapper(is_train=True)
    long_text = " ".join(["token"] * 5000)
    assert mapper({"text": long_text, "doc_id": 4}) == {"text": long_text, "doc_id": 4}  # no truncation here
    assert mapper({"text": "a"}) == {"text": "a"}
    for bad in ({"text": "  "}, {"text": None}, {"doc_id": 9}):
        with pytest.raises(ValueError, match="'text' must be a non-empty str"):
            mapper(bad)
    with pytest.raises(TypeError):
        mapper("text")


def test_text_mapper_from_config():
    from detectron2.config import get_cfg

    assert TextDatasetMapper(get_cfg(), is_train=False).is_train is False


def test_shapes_text_registration(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes_dataset(root, num_train=8, num_val=4, image_size=64)
    register_shapes_tasks(str(root), prefix="xshapes")
    for split, n in (("train", 8), ("val", 4)):
        recs = DatasetCatalog.get(f"xshapes_text_{split}")
        lines = (root / "text" / f"corpus_{split}.txt").read_text().splitlines()
        assert [r["text"] for r in recs] == [line.strip() for line in lines if line.strip()]
        assert len(recs) == n and [r["doc_id"] for r in recs] == list(range(n))
    with pytest.raises(FileNotFoundError, match="labels_test.json"):
        register_shapes_tasks(str(root), splits=("test",), prefix="xshapes")


@pytest.fixture
def restore_shapes_registrations():
    """register_all_builtin replaces the global shapes_* entries; put the previous ones back."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n).as_dict()) for n in DatasetCatalog.list() if n.startswith("shapes_")}
    yield
    for n in [n for n in DatasetCatalog.list() if n.startswith("shapes_")]:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
    for n, (func, meta) in saved.items():
        DatasetCatalog.register(n, func)
        MetadataCatalog.get(n).set(**{k: v for k, v in meta.items() if k != "name"})


def test_builtin_registers_shapes_tasks(tmp_path, restore_shapes_registrations):
    from up2.data.datasets.builtin import register_all_builtin

    register_all_builtin(str(tmp_path))  # nothing there: nothing registered, no error
    generate_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=4, image_size=64)
    register_all_builtin(str(tmp_path))
    for name in ("shapes_cls_train", "shapes_caption_val", "shapes_text_train", "shapes_train"):
        assert name in DatasetCatalog.list()
    assert len(DatasetCatalog.get("shapes_text_val")) == 4
