# Install the carried wheels on an offline GPU machine and put them and up2 on PYTHONPATH.
# Source it from the repo root (it exports PYTHONPATH into your shell):
#
#     . tools/gpu_install.sh && python3 projects/benchmark/gpu_check.py
#
# .whl/ comes from `tools/gpu_wheels.py`, run on a machine with pip (docs/gpu.md). The wheels
# go into $UP2_SITE (default /tmp/site), not into the machine's Python: nothing there changes,
# and the machine's torch / transformers are the ones used. No network, no dependencies resolved
# (--no-deps: the rest is on the machine, ../shared/GPU.md). sal-detectron2 publishes only a
# CPython 3.10 wheel; its Python code runs on 3.12 (its compiled _C does not, and up2 does not
# use it), so it is installed with --python-version 3.10. Returns non-zero on any failure.

_up2_site="${UP2_SITE:-/tmp/site}"
_up2_py="${PYTHON:-python3}"

_up2_pip() {
  "$_up2_py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_up2_site" "$@"
}

_up2_install() {
  local d2 rest
  d2=$(ls .whl/sal_detectron2-*.whl 2>/dev/null)
  rest=$(ls .whl/*.whl 2>/dev/null | grep -v '/sal_detectron2-')
  if [ ! -f up2/__init__.py ] || [ -z "$d2" ] || [ -z "$rest" ]; then
    echo "gpu_install: run from the repo root with the wheels of tools/gpu_wheels.py in .whl/" >&2
    return 1
  fi
  _up2_pip --only-binary=:all: --python-version 3.10 --implementation cp $d2 || return 1
  _up2_pip $rest || return 1
  export PYTHONPATH="$PWD:$_up2_site${PYTHONPATH:+:$PYTHONPATH}"
  "$_up2_py" -c "import detectron2, fvcore, up2; print('gpu_install: up2 and detectron2', detectron2.__version__, 'import')"
}

_up2_install
