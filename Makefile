# Every target sets itself up: the virtual environment is (re)built from requirements.txt when it is
# missing or requirements.txt changed (keyed by its hash), so `make demo` / `make test` work on a
# fresh clone. VENV may point outside the clone (CI keeps one per requirements hash).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
REQHASH := $(shell $(PY) -c "import hashlib;print(hashlib.sha256(open('requirements.txt','rb').read()).hexdigest()[:16])")
HERE    := $(shell pwd)
HEREHASH:= $(shell $(PY) -c "import hashlib,os;print(hashlib.sha256(os.getcwd().encode()).hexdigest()[:16])")
DEPS    := $(VENV)/.deps-$(REQHASH)
READY   := $(VENV)/.cdkit-$(HEREHASH)-$(REQHASH)
PYTEST_ARGS ?=

.PHONY: setup demo test test-numerics bench clean-venv lab notebooks rehearse weights

setup: $(READY)

$(DEPS): requirements.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.deps-* ; touch $@

# The editable install points at this clone; redone when the clone moves.
$(READY): $(DEPS) pyproject.toml
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@# kernels of this environment (papermill, JupyterLab) start without the 'TCP without encryption' warning
	$(BIN)/python -c "from cdkit.steps.pipeline import install_kernel_config; install_kernel_config()"
	@rm -f $(VENV)/.cdkit-* ; touch $@

# overwrite=true: the demo retrains its own models in runs/demo (elsewhere a finished model folder is refused)
demo: $(READY)
	$(BIN)/python -m cdkit demo overwrite=true

test: $(READY)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# After editing notebooks (or changing a Params class): each parameters cell regenerated from its Params class,
# outputs, execution counts and transient metadata stripped; prose and other cells kept (tools/fix_notebooks.py)
notebooks: $(READY)
	$(BIN)/python tools/fix_notebooks.py

# The tests that train models or assert effects, under the numerics of other machines (threads, seeds,
# ATen's CPU kernels): docs/TESTING.md. SETTINGS="CDKIT_TEST_THREADS=2 ..." to choose them.
test-numerics: $(READY)
	PY=$(BIN)/python tools/perturb_tests.sh

bench: $(READY)
	$(BIN)/python bench/index.py

# Every step at the competition's real size (scales of it), in a budget: runs/rehearse/report.md.
# make rehearse SCALES="0.0625 0.25 1" DATA=/work/rehearse-data   (data sets are written once, then reused)
SCALES ?= 0.0625 0.25
DATA   ?= data/rehearse
rehearse: $(READY)
	$(BIN)/python bench/rehearse.py --scales $(SCALES) --data-root $(DATA)

# Jupyter refuses to start as root without --allow-root (containers, cloud machines run as root)
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(READY)
	$(BIN)/jupyter lab notebooks/ $(ALLOW_ROOT)

# ImageNet weights for the *_full.yaml files (needs internet once): make weights ARCHS="resnet101 seresnet50"
# (FILE=ARCH: weights/FILE.pth from timm's ARCH)
ARCHS ?= resnet101 seresnet50 inception_v3 inception_v4 xception=legacy_xception
weights: $(READY)
	@mkdir -p weights
	$(BIN)/python -c "import sys, timm, torch; [torch.save(timm.create_model(a.split('=')[-1], pretrained=True).state_dict(), 'weights/' + a.split('=')[0] + '.pth') for a in sys.argv[1:]]" $(ARCHS)

clean-venv:
	rm -rf $(VENV)
