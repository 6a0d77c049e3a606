# zim-lightning: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision are pinned here, in the install step, not in pyproject: these releases lie on
# the development machines' disk, and an unpinned torch pulls a multi-GB download.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Every other package at the version the tests last passed with, so that a new release cannot break a
# fresh install (`make constraints` rewrites the file from .venv); `rm -rf .venv && make install
# CONSTRAINTS=` installs the newest releases pyproject allows instead.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

DATA ?= data/synthetic
OUT ?= reports
MODEL ?=
CHECKPOINT ?=
SAM_CHECKPOINT ?=
RUN_CONFIG ?=
TRAINER ?= cpu
ARGS ?=
SYNTH_CONVERTER = --data.init_args.train_shards='$(DATA)/matting/train/matting-{000000..000001}.tar' \
	--data.init_args.val_shards=$(DATA)/matting/val/matting-000000.tar --data.init_args.seg_shards=$(DATA)/seg/seg-000000.tar
SYNTH_ZIM = --data.init_args.train_shards='$(DATA)/matting/train/matting-{000000..000001}.tar' \
	--data.init_args.val_shards=$(DATA)/matting/val/matting-000000.tar
# The synthetic data, unless DATA holds a complete set (not one an interrupted `synth` left)
SYNTH_IF_INCOMPLETE = $(BIN)/python -c "import sys; from zim_lightning.data.synthetic import is_complete; \
	sys.exit(not is_complete('$(DATA)'))" || $(BIN)/zim-lightning synth --out $(DATA) --seed 0
SA1B ?= $(DATA)/sa1b
SA1B_MATTE ?= $(DATA)/sa1b_matte
CONVERTER ?=
CONVERTER_MODEL ?=
EVAL_DATA ?= $(DATA)/micromat
EVAL_FORMAT ?= micromat
EVAL_LAYOUT ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS) $(PIP_CONSTRAINTS)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PINS) $(PIP_CONSTRAINTS)
	# The official ONNX runner, for the export round-trip tests; --no-deps because it asks for
	# onnxruntime-gpu, while the CPU onnxruntime from the dev extras is all it needs here.
	$(BIN)/pip install -q --no-deps zim-anything easydict $(PIP_CONSTRAINTS)
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with dev extras (versions from constraints.txt)

constraints: $(STAMP) ## Rewrite constraints.txt from .venv (after `rm -rf .venv && make install CONSTRAINTS=` and a passing `make test`)
	{ echo "# Versions the tests passed with; written by \`make constraints\` (torch, torchvision and the CUDA"; \
	  echo "# packages they bring are pinned in the Makefile)."; \
	  $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|torchvision|triton)==|^(nvidia|cuda)-'; } > constraints.txt
	touch $(STAMP)  # .venv holds what the file now says

synth: $(STAMP) ## Write the synthetic dataset to DATA (default data/synthetic)
	$(BIN)/zim-lightning synth --out $(DATA) --seed 0

demo: $(STAMP) ## Run the main job end to end on the built-in synthetic data
	$(BIN)/python -m zim_lightning.demo --out $(OUT)/demo

test: $(STAMP) ## Run the test suite (CPU, a few minutes)
	$(BIN)/pytest

lint: $(STAMP) ## Lint with ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP) ## Format with ruff
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

train-converter: $(STAMP) ## Train the label converter: tiny on the synthetic DATA=, or CONFIG=configs/converter/paper.yaml with its starting weights and shards set by ARGS="--model.init_args.net.init_args.backbone_checkpoint=... --data.init_args.train_shards=... --data.init_args.val_shards=... --data.init_args.seg_shards=..."; TRAINER=cpu|gpu|ddp|v100
	$(if $(CONFIG),,$(SYNTH_IF_INCOMPLETE))
	$(BIN)/zim-lightning fit -c configs/trainer/$(TRAINER).yaml -c $(or $(CONFIG),configs/converter/tiny.yaml) $(if $(CONFIG),,$(SYNTH_CONVERTER)) $(ARGS)

train-zim: $(STAMP) ## Train ZIM: tiny on the synthetic DATA=, or CONFIG=configs/zim/vit_b.yaml with its starting weights and shards (SA1B-Matte) set by ARGS="--model.init_args.net.init_args.sam_checkpoint=... --data.init_args.train_shards=..."; TRAINER=cpu|gpu|ddp|v100
	$(if $(CONFIG),,$(SYNTH_IF_INCOMPLETE))
	$(BIN)/zim-lightning fit -c configs/trainer/$(TRAINER).yaml -c $(or $(CONFIG),configs/zim/tiny.yaml) $(if $(CONFIG),,$(SYNTH_ZIM)) $(ARGS)

results: $(STAMP) ## Rerun docs/results.md's experiments (CPU, about 30 min on an idle 2-core box; see results.md for the commits its figures come from)
	$(BIN)/python scripts/results_converter.py --work runs/results --steps 1500 --json docs/results/converter.json
	$(BIN)/python scripts/results_zim.py --work runs/results --steps 1500 --json docs/results/zim.json
	$(BIN)/python scripts/results_plot.py docs/results/converter.json docs/results/zim.json --out docs/images/loss_curves.png

build-sa1b-matte: $(STAMP) ## Convert SA-1B masks to SA1B-Matte shards (SA1B=, SA1B_MATTE=, CONVERTER=ckpt, CONVERTER_MODEL=, ARGS=; resumable; without CONVERTER= a random-weight converter_tiny at crop 256: a pipeline test only)
	$(BIN)/zim-lightning build-sa1b-matte --sa1b $(SA1B) --out $(SA1B_MATTE) \
		$(if $(CONVERTER),--checkpoint $(CONVERTER) $(if $(CONVERTER_MODEL),--model $(CONVERTER_MODEL)),--model converter_tiny --crop-size 256) $(ARGS)

# The network: RUN_CONFIG (a fit run's config.yaml), else MODEL, else the one a fit checkpoint carries,
# else (no CHECKPOINT: random weights) the tiny model.
NET_ARGS = $(if $(RUN_CONFIG),--run-config $(RUN_CONFIG),$(if $(MODEL),--model $(MODEL),$(if $(CHECKPOINT),,--model tiny)))

eval: $(STAMP) ## Evaluate CHECKPOINT= (a fit checkpoint; MODEL= for plain weights, RUN_CONFIG= a fit run's config.yaml; none: tiny, random; or MODEL= SAM_CHECKPOINT=: SAM itself, its masks as the binary rows) on EVAL_DATA (EVAL_FORMAT=, EVAL_LAYOUT= for folders) into OUT/eval
	$(BIN)/zim-lightning eval $(NET_ARGS) \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		$(if $(SAM_CHECKPOINT),--sam-checkpoint $(SAM_CHECKPOINT) --baselines binary) \
		--data $(EVAL_DATA) --format $(EVAL_FORMAT) $(if $(EVAL_LAYOUT),--layout $(EVAL_LAYOUT)) \
		--prompt both --out $(OUT)/eval --save-predictions

serve: $(STAMP) ## Interactive matting page on 127.0.0.1:7860 (CHECKPOINT=; MODEL=tiny|vit_b|vit_l|vit_h for plain weights, or RUN_CONFIG=; MODEL= SAM_CHECKPOINT= for SAM itself)
	$(BIN)/zim-lightning serve $(NET_ARGS) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		$(if $(SAM_CHECKPOINT),--sam-checkpoint $(SAM_CHECKPOINT))

clean: ## Remove generated data and reports (keeps .venv)
	rm -rf data/synthetic reports runs lightning_logs .pytest_cache

.PHONY: help install constraints synth demo test lint format clean serve eval build-sa1b-matte train-converter train-zim results
