# Two commands for a fresh machine: `make demo` (set up, run the main job on the built-in phantom) and
# `make test` (set up, lint, run the tests under a virtual X server).
VENV ?= .venv
PY := $(VENV)/bin/python
# What napari's Qt needs on a headless Debian: a virtual X server, Mesa OpenGL and the xcb/xkbcommon libraries;
# Orthanc with its DICOMweb plugin: the PACS that tests/cli/test_dicomweb.py starts on a free port.
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 orthanc orthanc-dicomweb

.PHONY: setup apt demo test lint clean gpu-bundle
setup: apt $(VENV)/.installed

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch first: the CPU wheel. A bare `torch` requirement would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(VENV)/bin/ctcolor warmup
	touch $@

lint: setup
	$(VENV)/bin/ruff check src tests examples tools
	$(VENV)/bin/ruff format --check src tests examples tools
	$(VENV)/bin/npe2 validate napari-ctcolor
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet

# The whole suite in TEST_WORKERS pytest-xdist processes of 1 torch thread each (the 2 cores busy; worksteal hands a
# free worker the tests another has not begun), then the tests that compare runs or official outputs
# (marker `numeric`) again in one process on 2 threads: a CPU's floats depend on the thread count, and every claim
# must hold on both (tests/conftest.py); with them the viewer's responsiveness tests (marker `alone`), which need the
# machine to themselves.
TEST_WORKERS ?= 2
test: lint
	CTCOLOR_TEST_THREADS=1 xvfb-run -a $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not alone"
	CTCOLOR_TEST_THREADS=2 xvfb-run -a $(PY) -m pytest -m "numeric or alone"

demo: setup
	$(PY) examples/demo.py --out demo-out

# The offline GPU bundle (docs/gpu-server.md): build/gpu-bundle/, at most 60 MiB, for the GPU server's CPython.
PYTHON ?= 3.12
gpu-bundle: setup
	$(PY) tools/gpu_bundle.py --python $(PYTHON) --out build/gpu-bundle

clean:
	rm -rf $(VENV) demo-out build .pytest_cache .site .import_linter_cache
