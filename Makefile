# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch this machine allows (a CUDA build that also runs on the CPU). On your own GPU machine,
# override it, e.g.: make demo TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed-stamp
OUT    ?= outputs/demo
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test test-browser demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,fast,app]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# The app in a real headless browser: Chromium and its driver from the system's packages (never a
# browser downloaded at run time); writes docs/images/app_*.png.
test-browser: install
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)
	$(BIN)/python -m pip install -q -e '.[browser]'
	HF_HUB_OFFLINE=1 ICD_BROWSER_TEST=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_app_browser.py

demo: install
	HF_HUB_OFFLINE=1 OUT=$(OUT) bash scripts/demo.sh

clean:
	rm -rf outputs runs
