# The two entry points: `make demo` and `make test`. Each creates .venv when it
# is missing and installs what it needs (torch pinned to the release these
# machines carry on disk), then runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.helip-installed
OUT    ?= demo_out

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,app,open_clip_train]'
	$(PY) -m pip install -q pandas fsspec  # the open_clip_train extra's packages, named again: pip 23's editable install skipped them
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/helip demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache $(OUT)
