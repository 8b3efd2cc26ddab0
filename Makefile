# Everyday commands; scripts/setup.sh makes .venv and builds the extension first.
PY := .venv/bin/python

.PHONY: setup setup-models test test-models mutants lint format-csrc bench demo

setup:
	bash scripts/setup.sh

setup-models:
	bash scripts/setup.sh --models

test: setup
	$(PY) -m pytest tests benchmarks --benchmark-disable -q

# The real-model tests against the package installed in .venv-models (-P: not the checkout).
test-models: setup-models
	.venv-models/bin/python -P -m pytest tests/nn/test_real_models.py -q

# Plausible bugs put into a copy of the checkout, each of which its tests must catch (minutes).
mutants: setup
	$(PY) scripts/mutation_check.py --native

lint:
	.venv/bin/ruff check .

format-csrc:  # needs clang-format (Debian: apt-get install clang-format)
	clang-format -i csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh \
	    csrc/cuda/*.h csrc/cuda/*.cpp

bench: setup
	$(PY) -m pytest benchmarks --benchmark-json=cpu.json
	$(PY) benchmarks/report.py cpu.json -o benchmarks/RESULTS.md --preamble benchmarks/PREAMBLE.md --plot benchmarks/results.png

demo: setup
	$(PY) -m fgkernels.train demo
