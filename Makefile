# Two commands do all set-up: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test test-gpu lint format clean

$(BIN)/dmtrec: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	# torchrec's metadata pins the CUDA fbgemm-gpu; fbgemm-gpu-cpu above provides it.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: $(BIN)/dmtrec
	$(BIN)/dmtrec demo --out $(OUT)

test: $(BIN)/dmtrec
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -rs tests

# The CUDA tests (tests/test_gpu.py), on a machine with GPUs and the CUDA builds of torch and
# fbgemm-gpu 1.8.0; they skip themselves where CUDA is absent.
test-gpu: $(BIN)/dmtrec
	$(BIN)/python -m pytest -q -rs -m gpu tests/test_gpu.py

lint: $(BIN)/dmtrec
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(BIN)/dmtrec
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
