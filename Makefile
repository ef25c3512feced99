# Set-up and everyday commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel (fast here). GPU users: TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed
PROFILE ?= smoke
LAUNCHER ?= basic

.PHONY: help install train test test-all lint reproduce-table aggregate bench bench-quick bench-data bench-data-scale clean-venv

help:
	@echo "make install   fresh $(VENV) with $(TORCH_SPEC) and mode (editable, with dev extras)"
	@echo "make train     the main job: LoRA on SmolLM2-135M-Instruct, SNI case-study tasks (ARGS='...' adds overrides)"
	@echo "make test      the default test suite (slow tests excluded)"
	@echo "make test-all  every test, slow ones included"
	@echo "make lint      ruff"
	@echo "make reproduce-table PROFILE=smoke|cpu_check|cpu|paper [DRY_RUN=1] [LAUNCHER=basic|joblib|slurm]"
	@echo "                the profile's table sweeps (finished runs reused), then results/<PROFILE>/"
	@echo "make aggregate PROFILE=...   only rebuild results/<PROFILE>/ from finished runs (or the records in results/<PROFILE>/runs/)"
	@echo "make bench     speed + memory of every method vs PEFT LoRA and the per-expert loop (~20 min with ARGS=--no-bf16) -> benchmarks/results/"
	@echo "make bench-quick  the same at toy size, + top-k and bf16 rows   make bench-data  tokenisation cache timings (~7 min)"
	@echo "make bench-data-scale [SNI_FULL=/tmp/sni-full]  data=sni_train at upstream size (~2.0M instances), 1 and 2"
	@echo "                processes: first build + cached load, time and peak memory (long: both cores, see docs/data.md)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/mode-train $(ARGS)

# pytest exits 5 when it collects no tests: that is a failure, said plainly.
test: $(STAMP)
	@$(BIN)/python -m pytest $(ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(ARGS)

reproduce-table: $(STAMP)
	$(BIN)/python experiments/reproduce.py $(PROFILE) --launcher $(LAUNCHER) $(if $(DRY_RUN),--dry-run) $(if $(RECORDS),--records $(RECORDS)) $(if $(GPUS),--gpus $(GPUS)) $(if $(JOBS_PER_NODE),--jobs-per-node $(JOBS_PER_NODE)) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

aggregate: $(STAMP)
	$(BIN)/mode-aggregate $(PROFILE) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mode tests benchmarks scripts experiments

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.bench --quick $(ARGS)

bench-data: $(STAMP)
	$(BIN)/python -m benchmarks.bench --parts data $(ARGS)

SNI_FULL ?= /tmp/sni-full
bench-data-scale: $(STAMP)
	test -d $(SNI_FULL)/tasks || $(BIN)/python scripts/make_synthetic_sni.py $(SNI_FULL) --split train
	$(BIN)/python -m benchmarks.data_scale --sni-dir $(SNI_FULL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
