# up2: the two commands of the README, plus their parts. Every target installs what it needs (idempotent).
PY := .venv/bin/python
OUT ?= output/demo

.PHONY: install test demo shapes clean

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) projects/demo/main_job.py --output $(OUT)

shapes: install
	$(PY) datasets/prepare_shapes.py --out datasets/shapes

clean:
	rm -rf output datasets/shapes
