#!/usr/bin/env bash
# Create .venv in the repo root and install up2 with its dependencies (idempotent).
# Usage: bash tools/install.sh        (re-running is a no-op once the stamp is current)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
stamp="$VENV/.up2-installed"
# the stamp covers every build source: the kernels' C++ files and the Python that declares and
# builds them (cpp_library.py, build_kernels.py, each kernel's *library.py)
want="$(cat setup.py tools/install.sh up2/layers/build_kernels.py up2/layers/*library.py up2/layers/*/library.py \
  up2/layers/csrc/* | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# (this machine's pip config names local wheel folders that may be absent: drop those warnings)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install --upgrade "pip>=24" wheel "setuptools<81"
# PyTorch: the versions that lie on this machine's disk (see docs/development.md, Install).
"$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null || pip install torch==2.14.1 torchvision==0.29.1
# detectron2's own dependencies (installed before it so an existing build finds them too).
pip install "fvcore>=0.1.5" "iopath>=0.1.9" pycocotools "omegaconf>=2.1,<2.4" "hydra-core>=1.1" yacs termcolor tabulate cloudpickle matplotlib "setuptools<81"
# detectron2: prefer one that is already importable (e.g. an official build with compiled ops);
# otherwise take the pure-Python code of the sal-detectron2 wheel.
if ! "$VENV/bin/python" -c "import detectron2.config, detectron2.modeling" 2>/dev/null; then
  purelib="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  pip install --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
      --target "$purelib" --upgrade sal-detectron2==0.7.2
fi
pip install -e ".[dev]"
echo "install: note: pip may report that sal-detectron2 wants numpy<2 and black; that is its metadata only" \
     "(detectron2's code runs with numpy 2 here, as the test suite checks)"
# Compiled CPU kernels (multi-scale deformable attention, mask pasting; optional: without a C++
# compiler, or if a build fails, up2 runs the pure-PyTorch paths). Each builds into build/kernels/
# once per kernel source (an up-to-date kernel is not rebuilt).
if command -v "${CXX:-c++}" >/dev/null 2>&1 && command -v ninja >/dev/null 2>&1; then
  "$VENV/bin/python" -m up2.layers.build_kernels 2> >(grep -v "No CUDA runtime is found" >&2) \
    || echo "install: note: building a compiled CPU kernel failed; its pure-PyTorch path will be used"
else
  echo "install: note: no C++ compiler or ninja; skipping the compiled CPU kernels (pure-PyTorch paths are used)"
fi
echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
echo "install: .venv ready ($("$VENV/bin/python" -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)'))"
