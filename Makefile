# Two commands on a fresh machine:  make run  (the main job)  and  make test  (the tests).
# Both create .venv first; `make setup` is idempotent and instant once done.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-complete
# pip on these machines warns about every missing local index folder; drop just that noise.
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'

.PHONY: help setup preflight run stack-up stack-down pipeline repro test test-all lint clean bench

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the locked versions (constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; free-pipeline needs Python 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[ops,dev]" 2>&1 | $(QUIET_PIP)
	touch $@

preflight:  ## check data, ports and disk before installing or starting anything (seconds)
	@python3 infra/preflight.py

run: stack-up  ## main job: local stack up, then `prefect deployment run free/full-pipeline` (tiny preset)
	eval "$$($(BIN)/free stack env)"; $(BIN)/prefect deployment run free/full-pipeline --watch
	@$(BIN)/free stack links
	@echo "  Metrics     artifacts/metrics/metatest.json"
	@echo
	@echo "Next: .venv/bin/free promote   (alias champion -> this model; see README 'Promotion')"
	@echo "In a new shell, to use free / dvc / prefect / mlflow directly:"
	@echo '  source .venv/bin/activate && eval "$$(free stack env)"'

stack-up: preflight  ## start (or keep) the local Prefect, MLflow and S3 servers and the deployment worker
	@$(MAKE) --no-print-directory setup
	$(BIN)/free stack up

stack-down:  ## stop the local stack (by PID); its data stays in state/
	$(BIN)/free stack down

pipeline: setup  ## the whole pipeline in this process, no services (tiny preset)
	$(BIN)/free pipeline experiment=tiny

repro: setup  ## dvc repro (stages run bin/project-python: this project's .venv whatever PATH says)
	$(BIN)/dvc repro

# Two pytest workers, each taking whole test modules (--dist loadfile): a module's stack fixture starts
# once, in one worker. Much of a serial run waits (servers starting, flow runs polling); two workers
# kept the 2 cores 87% busy and took 18 min 5 s against 29 min 38 s serial (README, Development).
PYTEST_WORKERS ?= 2
test: setup  ## lint + default test suite (slow tests excluded)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=30  # the 30 slowest: keep the run near 20 min

test-all: setup  ## every test, slow ones included
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m ""

# The exact commands behind docs/RESULTS.md (about 1.5 hours on 2 CPU cores, one after another so
# that no benchmark's timing is disturbed by another).
bench: setup  ## all benchmarks as in docs/RESULTS.md -> benchmarks/results/*.json + *.png
	$(BIN)/free bench recovery experiment=tiny teachers.n_teachers=8 metalearn.iterations=40 inversion.scratch_steps=200 --seeds 2 --heldout 2 --max-steps 400
	$(BIN)/free bench eval experiment=tiny --episodes 50 --batches 10,50 --threads 1,2
	$(BIN)/free bench eval experiment=omniglot --episodes 20 --batches 10,20 --threads 2 --out benchmarks/results/eval-omniglot.json
	$(BIN)/python benchmarks/profile_hotpaths.py --compile
	$(BIN)/free bench pipeline --reruns 5
	$(BIN)/free bench pipeline metalearn.iterations=100 --out benchmarks/results/pipeline_long.json
	$(BIN)/python benchmarks/stack_idle_cpu.py
	$(BIN)/free bench accuracy experiment=tiny evaluate.episodes=100 --seeds 1
	$(BIN)/free bench units experiment=mini_imagenet
	$(BIN)/free bench fanout experiment=tiny --workers 1,2
	$(BIN)/free bench fanout experiment=tiny threads=1 teachers.n_teachers=8 --workers 1,2 --out benchmarks/results/fanout_threads1.json

lint: setup  ## ruff only
	$(BIN)/ruff check .

clean:  ## remove caches and build outputs (keeps .venv and artifacts)
	rm -rf .cache .pytest_cache .ruff_cache build *.egg-info
