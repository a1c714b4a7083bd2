# The two set-up commands of the README:
#   make demo   # tiny NeoX model with L2E, trained on CPU on the embedded Austen corpus
#   make test   # the test suite (CPU)
# Both create .venv and install requirements on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

export HF_HUB_OFFLINE       ?= 1
export HF_DATASETS_OFFLINE  ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE           ?= offline
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED     := 1

.PHONY: install demo demo-monitor demo-compare figures figures-compare test test-fast bench gpu-check clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# A run never overwrites its own checkpoints (docs/reliability.md), so a demo already
# trained is reported rather than refused; `make clean` trains it again.
TRAINED = [ -f $(1)/latest ] && echo "$(1) already holds a trained demo ($$(cat $(1)/latest)); 'make clean' to train it again"

demo: install
	@$(call TRAINED,runs/tiny/checkpoints) || \
	$(BIN)/python deepy.py train.py configs/local/tiny.yml

demo-monitor: install
	@$(call TRAINED,runs/tiny_monitor/checkpoints) || \
	$(BIN)/python deepy.py train.py configs/local/tiny.yml --override l2e.inhibition=none \
		log_dir=runs/tiny_monitor/logs save=runs/tiny_monitor/checkpoints

# The demo over 3 seeds, L2E vs monitor-only vs L2E with moving statistics, measured on
# held-out text: runs/compare/compare.{md,json,png} (docs/l2e.md §7).
demo-compare: install
	DS_ACCELERATOR=cpu $(BIN)/python tools/analysis/compare_runs.py --out runs/compare --jobs 2

# The report of the two demo runs (one seed each: it says so): verdict table, FKR curves,
# the Fig. 12 threshold curve and the other analyses, with held-out Austen text.
figures: install
	$(BIN)/python tools/analysis/report.py \
		--models L2E=runs/tiny/checkpoints monitor=runs/tiny_monitor/checkpoints \
		--features data/features/languages.jsonl data/features/genre.jsonl \
		--runs L2E=runs/tiny/logs/metrics.jsonl monitor=runs/tiny_monitor/logs/metrics.jsonl \
		--heldout data/austen_bpe4k_text_document --out runs/tiny/report

# The same report over demo-compare's seeds (mean ± sd, a verdict against the seed spread).
SEEDS  ?= 1234 1235 1236
comma  := ,
seeded  = $(subst $() ,$(comma),$(foreach s,$(SEEDS),runs/compare/runs/$(1)_$(s)/$(2)))
figures-compare: install
	$(BIN)/python tools/analysis/report.py \
		--models L2E=$(call seeded,L2E,checkpoints) monitor=$(call seeded,monitor,checkpoints) \
		--features data/features/languages.jsonl data/features/genre.jsonl \
		--runs L2E=$(call seeded,L2E,logs/metrics.jsonl) monitor=$(call seeded,monitor,logs/metrics.jsonl) \
		--heldout data/austen_bpe4k_text_document --out runs/compare/report

test: install
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python tools/warm_deepspeed.py
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra

test-fast: install
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not distributed"

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python tools/bench/bench_train_step.py
	OMP_NUM_THREADS=2 $(BIN)/python tools/bench/l2e_overhead.py
	OMP_NUM_THREADS=1 $(BIN)/python tools/bench/l2e_tracker.py
	$(BIN)/python tools/bench/bench_index_maps.py

# The GPU acceptance run (one CUDA GPU, <= 8 minutes); --smoke runs its code paths on CPU.
gpu-check: install
	$(BIN)/python tools/bench/gpu_check.py --json gpu_check.json

clean:
	rm -rf runs .pytest_cache
