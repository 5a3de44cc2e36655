# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch this machine allows (a CUDA build that also runs on the CPU). On your own GPU machine,
# override it, e.g.: make demo TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed-stamp
OUT    ?= outputs/demo

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,fast]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

demo: install
	HF_HUB_OFFLINE=1 OUT=$(OUT) bash scripts/demo.sh

clean:
	rm -rf outputs runs
