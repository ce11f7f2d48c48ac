# recloop: the one place every command lives. README, CI and developers use these targets.
#
#   make demo     install (once), then the whole loop on the embedded stack and its report
#   make test     install (once) and run the whole suite against a real local stack
#   make smoke    start the local stack and push a round trip through every part
#   make help     everything else

SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.8
PYTHON     ?= python3
UV         := $(PYTHON) -m uv
VENV       := .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.recloop-installed
PYTEST_ARGS ?=
# make test's pytest-xdist workers (tests/conftest.py groups the integration tests). 0, one
# process, is the default: on 2 cores two workers took 16.7 min in two runs and 25.6 min with
# three failures in a third (a Ray head and an ingestor starved), so 2 is opt-in for now
TEST_WORKERS ?= 0

export UV_LINK_MODE ?= copy
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: help uv install system-deps demo demo-quick test test-unit test-integration lint fmt up status smoke down purge bench-kafka bench-beam bench-serving bench-simulator bench-sim-fit bench-ab bench-ingest bench-training bench-ipa bench-ipa-offline bench-loop-offline bench-scale simulate analyze ingest train serve pretrain eval clean docs figures

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

uv:  ## install uv, the package manager that reads uv.lock (when missing)
	@$(UV) --version >/dev/null 2>&1 || { \
	  echo "== installing uv $(UV_VERSION) with pip"; \
	  $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)" || \
	  $(PYTHON) -m pip install --quiet --user "uv==$(UV_VERSION)"; }

system-deps:  ## check Java 17, Maven, Chromium and Prometheus (apt-get installs them when missing and root)
	@bash infra/system-deps.sh

$(STAMP): pyproject.toml uv.lock infra/kafka/pom.xml | uv
	@$(MAKE) --no-print-directory system-deps
	@echo "== installing the locked Python dependencies into $(VENV) (first time: a few minutes, torch is large)"
	$(UV) sync --frozen --extra cluster  # cluster: the Redis client Feast uses on a cluster (small)
	@echo "== fetching the Kafka broker's jars (first time: Maven, ~20 s)"
	$(BIN)/recloop fetch
	@touch $@

install: $(STAMP)  ## install everything (Python deps from uv.lock, Kafka jars); idempotent

demo: install  ## the main job: stack, seed model, four-arm A/B through the whole loop, report (~15 min)
	$(BIN)/recloop demo

demo-quick: install  ## the same on a sample of users, smaller rounds (~5 min)
	$(BIN)/recloop demo --quick

test: install  ## the whole suite: unit + integration against a real Kafka, Ray and Feast
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-unit: install  ## unit tests only (no broker, no Ray head)
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

test-integration: install  ## integration tests only
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

lint: install  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install  ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: install  ## start the local stack (Kafka, Ray head + Serve, Feast)
	$(BIN)/recloop up

status: install  ## one line per part of the stack
	$(BIN)/recloop status

smoke: up  ## start the stack, then a round trip through Kafka, Feast and Serve
	$(BIN)/recloop smoke

down: install  ## stop the local stack
	$(BIN)/recloop down

purge: install  ## stop the stack and delete its data (the jar cache stays)
	$(BIN)/recloop down --purge

DATA ?= ../shared/data/ml-100k
MODEL ?= onerec

pretrain: install  ## pre-train the seed OneRec model on DATA (default MovieLens-100k)
	$(BIN)/recloop pretrain --data $(DATA)

serve: install  ## deploy the recommendation service on the running stack (after pretrain)
	$(BIN)/recloop serve

eval: install  ## offline evaluation of MODEL (onerec|sasrec|pop) on DATA, table + JSON
	$(BIN)/recloop eval --model $(MODEL) --data $(DATA) --out benchmarks/results/eval_$(MODEL).json

bench-beam: install  ## beam-search latency, throughput, KV-cache speed-up and MFU
	$(BIN)/python -m benchmarks.beam_search

bench-serving: install  ## HTTP load on the service (own stack): batching, promotion, RSS
	$(BIN)/python -m benchmarks.serving

EXPERIMENT ?= infra/experiments/model-vs-baselines.yaml

simulate: install  ## simulated users' A/B traffic through the running stack (EXPERIMENT)
	$(BIN)/recloop simulate --experiment $(EXPERIMENT)

analyze: install  ## the A/B verdict of the latest simulated run (table + JSON)
	$(BIN)/recloop analyze

ingest: install  ## Kafka -> Feast + lake in the foreground, until Ctrl-C (`recloop ingest --detach`: actors)
	$(BIN)/recloop ingest

train: install  ## continuous training rounds on the lake, each gated version promoted (until Ctrl-C)
	$(BIN)/recloop train

bench-simulator: install  ## requests/s and events/s the simulator offers vs a plain HTTP client
	$(BIN)/python -m benchmarks.simulator

bench-sim-fit: install  ## the simulator's hidden user models: held-out fit to MovieLens, next-item rank vs SASRec (~3 min)
	$(BIN)/python -m benchmarks.sim_fit

bench-ab: install  ## A/A over 5 seeds and model vs popularity/random on MovieLens (own stack)
	$(BIN)/python -m benchmarks.ab_sanity

bench-ingest: install  ## ingestor: records/s into Feast + lake vs a raw consumer, lag, freshness (own stack)
	$(BIN)/python -m benchmarks.ingest

bench-training: install  ## continuous training: examples/s per round, round time, feedback-to-serving delay
	$(BIN)/python -m benchmarks.training

IPA_RUN := infra/experiments/ipa-vs-online.yaml

bench-ipa: install  ## online-ipa vs online vs frozen through the whole loop, 1% and 5% mirrored (~35 min)
	$(BIN)/python -m benchmarks.training --run-file $(IPA_RUN) --dpo-fraction 0.01 --out benchmarks/results/ipa_1pct.json
	$(BIN)/python -m benchmarks.training --run-file $(IPA_RUN) --dpo-fraction 0.05 --out benchmarks/results/ipa_5pct.json

bench-ipa-offline: install  ## IPA offline and paired: DPO vs next-token only, hidden-model ground truth (~3 min)
	$(BIN)/python -m benchmarks.ipa_offline --steps 4 --ratios 0.01,0.05,0.2 --holdout-users 0.3

bench-scale: install  ## OneRec vs SASRec as the catalogue grows (2 k-100 k items): epoch time, peak memory, eval time
	$(BIN)/python -m benchmarks.scale

bench-loop-offline: install  ## the loop without the stack: how rounds learn vs frozen and popularity, 5 runs (~5 min)
	$(BIN)/python -m benchmarks.loop_offline --arm online-ntp:reward_weighting=none

bench-bias: install  ## symbiosis bias of A/B designs under online learning vs the simulator's truth, 5 seeds (~7 min; A=, B= arms)
	$(BIN)/python -m benchmarks.bias $(if $(A),--a $(A)) $(if $(B),--b $(B))

figures: install  ## the README's and docs' figures, rendered from benchmarks/results/ (--check: CHECK=1)
	$(BIN)/python -m infra.figures $(if $(CHECK),--check)

docs: install  ## the documentation site: CLI reference from the parsers, then mkdocs --strict into site/
	$(BIN)/python -m infra.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-kafka: install  ## producer/consumer throughput of the event helpers vs raw kafka-python
	$(BIN)/python -m benchmarks.kafka_throughput

clean:  ## remove the virtualenv and all local state
	-$(BIN)/recloop down 2>/dev/null
	rm -rf $(VENV) .recloop
