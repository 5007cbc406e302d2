"""ImageNet-style image-classification folders (paper §5.1: ImageNet-1k classification).

Layout::

    <root>/<class folder>/<image>.{JPEG,jpg,jpeg,png}   (extension case ignored)

Class folders are sorted by name; class ``i`` (contiguous id) is the i-th folder. Hidden
entries (names starting with ".") and files with other extensions are ignored. Folders without
images keep their class id (so train and val of one dataset number classes alike; both need
the same class folders) and are logged.

A registered dataset yields one dict per image, sorted by (class folder, file name)::

    {"file_name": str (absolute path), "image_id": int (0..N-1 in that order), "class_id": int}

Class names (``thing_classes``, the human-readable target set the model encodes as text) come
from an optional class-name file, one of:

    * json object ``{folder: name}`` (e.g. wnid -> "tench"); extra keys are allowed;
    * json object ``{"0": [folder, name], ...}`` (the Keras/torchvision ``imagenet_class_index.json``);
    * text, one ``<folder> <name>`` per line (e.g. ImageNet's ``LOC_synset_mapping.txt``; the name
      is the rest of the line, "tench, Tinca tinca"); extra folders are allowed;
    * text, one name per line, in sorted-folder order (exactly one line per class folder).

A text file is read in the ``<folder> <name>`` form when the first token of its first non-empty
line is a class folder and a name follows; otherwise in the one-name-per-line form. Blank lines
are skipped. Without a file, the folder names are the class names.

Class names are made unique (:func:`unique_class_names`), since two classes with one name would
share one text target: a name used by several folders (ImageNet's ``LOC_synset_mapping.txt`` has
two "crane"s) becomes ``"<name> (<folder>)"`` for each of them, and the change is logged. Names
used once are never changed.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .text_corpus import replace_registration

__all__ = ["register_imagenet_folder", "load_imagenet_folder", "read_class_names", "unique_class_names",
           "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def unique_class_names(
    names: Sequence[str],
    alternatives: Optional[Sequence[Sequence[str]]] = None,
    hints: Optional[Sequence[str]] = None,
) -> List[str]:
    """Make C class names unique, deterministically, changing only names that several classes share.

    For each shared name (groups in order of first use, members in index order): a member takes
    its first alternative that no class uses as its name and no earlier change took (ImageNet's
    second "maillot", "maillot, tank suit", becomes "tank suit"). If one member is left with the
    shared name it keeps it; if several are, each becomes ``"<name> (<hint>)"`` (or
    ``"<name> (class <i>)"`` when that is taken too or no hint is given).

    Args:
        names: C preferred names; index = class id.
        alternatives: per class, other names in order of preference (e.g. a synset's other lemmas).
        hints: per class, a short distinguishing word (e.g. "bird" / "machine", or the folder).
    Returns:
        C distinct names; ``result[i] == names[i]`` whenever ``names[i]`` is used once.
    Raises:
        ValueError: ``alternatives`` / ``hints`` do not have one entry per class.
    """
    names = list(names)
    for what, seq in (("alternatives", alternatives), ("hints", hints)):
        if seq is not None and len(seq) != len(names):
            raise ValueError(f"unique_class_names: {what} has {len(seq)} entries for {len(names)} class names")
    taken = set(names)
    out = list(names)
    groups: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for name, members in groups.items():
        if len(members) < 2:
            continue
        left = []
        for i in members:
            alt = next((a.strip() for a in (alternatives[i] if alternatives else ()) if a.strip() and a.strip() not in taken), None)
            if alt is None:
                left.append(i)
            else:
                out[i] = alt
                taken.add(alt)
        if len(left) < 2:
            continue
        for i in left:
            hint = hints[i].strip() if hints and hints[i] and hints[i].strip() else None
            candidate = f"{name} ({hint})" if hint else None
            if candidate is None or candidate in taken:
                candidate = f"{name} (class {i})"
            if candidate in taken:  # only if a class is literally called so: say so rather than guess
                raise ValueError(f"unique_class_names: cannot disambiguate {name!r} of class {i}: {candidate!r} is taken")
            out[i] = candidate
            taken.add(candidate)
    return out


def _class_folders(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder root is not a directory: {root}")
    folders = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"image folder root {root} has no class sub-folders; expected <root>/<class>/<image>")
    return folders


def _names_from_json(path: str, folders: Sequence[str]) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"class-name file {path} is not valid json: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"class-name file {path}: expected a non-empty json object {{folder: name}} or {{index: [folder, name]}}")
    mapping: Dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, list):  # {"0": ["n01440764", "tench"]}
            if len(value) != 2 or not all(isinstance(v, str) for v in value):
                raise ValueError(f"class-name file {path}, key {key!r}: expected [folder, name] strings, got {value!r}")
            folder, name = value
        elif isinstance(value, str):
            folder, name = key, value
        else:
            raise ValueError(f"class-name file {path}, key {key!r}: expected a str name or [folder, name], got {value!r}")
        if folder in mapping:
            raise ValueError(f"class-name file {path}, key {key!r}: folder {folder!r} is listed twice")
        mapping[folder] = name.strip()
    return _lookup(mapping, folders, path)


def _lookup(mapping: Dict[str, str], folders: Sequence[str], path: str) -> List[str]:
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ValueError(
            f"class-name file {path} has no name for class folder(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(folders)} missing)"
        )
    empty = [f for f in folders if not mapping[f]]
    if empty:
        raise ValueError(f"class-name file {path}: empty name for class folder {empty[0]!r}")
    return [mapping[f] for f in folders]


def _names_from_text(path: str, folders: Sequence[str]) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, start=1)]
    except UnicodeDecodeError as e:
        raise ValueError(f"class-name file {path} is not valid UTF-8 text: {e}") from e
    lines = [(i, line) for i, line in lines if line]
    if not lines:
        raise ValueError(f"class-name file {path} is empty; expected one class per line")
    folder_set = set(folders)
    first = lines[0][1].split(None, 1)
    if len(first) == 2 and first[0] in folder_set:  # "<folder> <name>" lines
        mapping: Dict[str, str] = {}
        for line_no, line in lines:
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise ValueError(
                    f"class-name file {path}, line {line_no}: expected '<folder> <name>' (as on line {lines[0][0]}), got {line!r}"
                )
            if parts[0] in mapping:
                raise ValueError(f"class-name file {path}, line {line_no}: folder {parts[0]!r} is listed twice")
            mapping[parts[0]] = parts[1].strip()
        return _lookup(mapping, folders, path)
    if len(lines) != len(folders):  # one name per line, sorted-folder order
        where = f"line {lines[len(folders)][0]} is one too many" if len(lines) > len(folders) else "too few lines"
        raise ValueError(
            f"class-name file {path}: {len(lines)} names for {len(folders)} class folders ({where}); expected one "
            f"name per line in sorted-folder order, or '<folder> <name>' lines (first token {first[0]!r} is not a folder)"
        )
    return [line for _, line in lines]


def read_class_names(root: str, class_names_file: Optional[str] = None) -> List[str]:
    """Class names, one per sorted class folder of ``root`` (module docstring for the file forms).

    Args:
        root: the dataset root holding one folder per class.
        class_names_file: optional ``.json`` (by extension) or text file of class names.
    Returns:
        C distinct names; index = contiguous class id (a name shared by several folders gets
        `` (<folder>)`` appended for each of them; :func:`unique_class_names`).
    Raises:
        FileNotFoundError: ``root`` or the class-name file does not exist.
        ValueError: no class folders; a malformed class-name file, a folder without a name, a
            folder listed twice, or a wrong line count (the message names the file and line).
    """
    folders = _class_folders(root)
    if class_names_file is None:
        names = list(folders)
    else:
        path = os.fspath(class_names_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"class-name file not found: {path}")
        names = _names_from_json(path, folders) if path.lower().endswith(".json") else _names_from_text(path, folders)
    unique = unique_class_names(names, hints=folders)
    changed = [f"{folder}: {a!r} -> {b!r}" for folder, a, b in zip(folders, names, unique) if a != b]
    if changed:
        logger.warning(f"{root}: class names shared by several class folders were made unique: "
                       f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}")
    return unique


def load_imagenet_folder(
    root: str, class_folders: Optional[Sequence[str]] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> List[dict]:
    """List the images of an ImageNet-style folder (module docstring for the record format).

    Args:
        root: the dataset root.
        class_folders: the class folders in class-id order; default: the sorted folders of
            ``root`` (registration passes the list it saw, so ids cannot shift later).
        extensions: file extensions (with the dot, case ignored) counted as images.
    Returns:
        N records sorted by (class folder, file name).
    Raises:
        FileNotFoundError: ``root`` or one of ``class_folders`` is not a directory.
        ValueError: no class folders, or no image in any of them.
    """
    root = os.path.abspath(os.fspath(root))
    folders = _class_folders(root) if class_folders is None else list(class_folders)
    exts = tuple(e.lower() for e in extensions)
    records: List[dict] = []
    empty = []
    for class_id, folder in enumerate(folders):
        directory = os.path.join(root, folder)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"class folder {directory} (class id {class_id}) is missing")
        files = sorted(
            f for f in os.listdir(directory)
            if not f.startswith(".") and f.lower().endswith(exts) and os.path.isfile(os.path.join(directory, f))
        )
        if not files:
            empty.append(folder)
        for f in files:
            records.append({"file_name": os.path.join(directory, f), "image_id": len(records), "class_id": class_id})
    if not records:
        raise ValueError(f"image folder root {root}: no image files with extensions {exts} in any class folder")
    if empty:
        logger.warning(f"image folder root {root}: {len(empty)} class folders have no images, e.g. {empty[:3]}")
    return records


def register_imagenet_folder(name: str, root: str, class_names_file: Optional[str] = None) -> None:
    """Register an ImageNet-style classification folder under ``name`` (images listed lazily).

    Class names are read now, so the metadata is complete right away: ``thing_classes`` (C
    names, index = ``class_id``), ``class_folders`` (the C sorted folder names),
    ``evaluator_type="classification"``, ``image_root``, ``class_names_file`` (or None).

    Args:
        name: dataset name; an existing registration of it is replaced (logged).
        root: dataset root, ``<root>/<class folder>/<image>``.
        class_names_file: optional class-name file (module docstring).
    Raises:
        ValueError, FileNotFoundError: see :func:`read_class_names`; bad ``name``.
    """
    root = os.path.abspath(os.fspath(root))
    names = read_class_names(root, class_names_file)
    folders = _class_folders(root)
    replace_registration(name, root)
    DatasetCatalog.register(name, lambda: load_imagenet_folder(root, folders))
    MetadataCatalog.get(name).set(
        thing_classes=names,
        class_folders=folders,
        evaluator_type="classification",
        image_root=root,
        class_names_file=None if class_names_file is None else os.path.abspath(os.fspath(class_names_file)),
    )
