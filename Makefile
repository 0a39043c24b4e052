# vqscope: every target installs what it needs on a fresh Debian 12 machine.
PY      := .venv/bin/python
STAMPS  := .stamps
CSRC    := $(wildcard inspector/csrc/*.c inspector/csrc/*.h)

.PHONY: all deps venv build lint test test-unit demo bench-decoder bench-net bench-blk bench-proxy bench-exporter bench-attach bench-record bench-probes bench-doctor soak fuzz fuzz-build clean

all: build

$(STAMPS)/deps: scripts/install-deps.sh
	bash scripts/install-deps.sh
	@mkdir -p $(STAMPS) && touch $@

# The venv comes from Debian's python3 with system site-packages so that
# BCC's binding (python3-bpfcc) imports. build/wheelhouse: the wheels of
# vqscope's dependencies, from which tests/integration/test_wheel.py installs
# the built wheel into a new venv without the index.
$(STAMPS)/venv: $(STAMPS)/deps pyproject.toml setup.py
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -m pip install -q virtme-ng
	$(PY) -m pip download -q --no-build-isolation -d build/wheelhouse .
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv

$(STAMPS)/build: $(STAMPS)/venv $(CSRC) inspector/_build_vqd.py
	$(PY) inspector/_build_vqd.py
	@touch $@

build: $(STAMPS)/build

# The import direction of README "Architecture" ([tool.importlinter] in
# pyproject.toml), on this checkout (lint-imports puts the cwd first on sys.path).
lint: venv
	.venv/bin/lint-imports --no-cache --no-logo

test: build lint
	$(PY) -m pytest -ra -p no:cacheprovider $(PYTEST_ARGS)

test-unit: build
	$(PY) -m pytest -ra -p no:cacheprovider -m 'not dpdk and not qemu' $(PYTEST_ARGS)

demo: build
	.venv/bin/vqscope demo

bench-decoder: build
	$(PY) tests/bench/bench_decoder.py

bench-net: build
	$(PY) tests/bench/bench_net.py

# load blk's 4 KiB randread/randwrite at iodepth 32 against serve blk and
# qemu-storage-daemon on tmpfs images, interleaved rounds: one JSON line.
bench-blk: build
	$(PY) tests/bench/bench_blk.py

# dpdk-testpmd virtio-user <-> net_vhost directly, through `vqscope proxy` and
# through `vqscope proxy --count-notifications`, interleaved rounds: one JSON line.
bench-proxy: build
	$(PY) tests/bench/bench_proxy.py

# vqscope exporter with 64 replayed back-ends x 4 queues (tests/bench/replay_backends.py,
# recorded from serve net under dpdk-testpmd): its CPU scraped every 1 s and not
# scraped, interleaved rounds, and the /metrics latency: one JSON line.
bench-exporter: build
	$(PY) tests/bench/bench_exporter.py

bench-attach: build
	$(PY) tests/bench/bench_attach.py

bench-probes: build
	$(PY) tests/bench/bench_probes.py

bench-record: build
	$(PY) tests/bench/bench_record.py

# The analyzer's cost per queue per snapshot (256 queues) beside the snapshot
# codec's, and the TUI's frame time for 256 queues.
bench-doctor: build
	$(PY) tests/bench/bench_doctor.py

# 10 minutes (SOAK_SECONDS) of DPDK load on vqscope serve with the TUI attached:
# the back-end's RSS within 5% and its fd count flat after a 1-minute warm-up.
soak: build
	$(PY) tests/bench/soak.py

# libFuzzer harnesses of the C decoder and data path (fuzz/), built straight
# from the .c files with ASan+UBSan (clang-14, libclang-rt-14-dev).
CLANG       ?= clang-14
FUZZ_CFLAGS := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinspector/csrc

DECODER_C   := inspector/csrc/vqd_decode.c inspector/csrc/vqd_decode_walk.c

build/fuzz/fuzz_decoder: fuzz/fuzz_decoder.c fuzz/fuzz_input.h fuzz/fuzz_decoder_input.h $(CSRC)
	@mkdir -p build/fuzz
	$(CLANG) $(FUZZ_CFLAGS) fuzz/fuzz_decoder.c $(DECODER_C) -o $@

build/fuzz/fuzz_decoder_packed: fuzz/fuzz_decoder_packed.c fuzz/fuzz_input.h fuzz/fuzz_decoder_input.h $(CSRC)
	@mkdir -p build/fuzz
	$(CLANG) $(FUZZ_CFLAGS) fuzz/fuzz_decoder_packed.c $(DECODER_C) inspector/csrc/vqd_decode_packed.c \
		inspector/csrc/vqd_guard.c -o $@ -lpthread

build/fuzz/fuzz_datapath: fuzz/fuzz_datapath.c fuzz/fuzz_input.h $(CSRC)
	@mkdir -p build/fuzz
	$(CLANG) $(FUZZ_CFLAGS) fuzz/fuzz_datapath.c $(filter %.c,$(CSRC)) -o $@ -lpthread -luring

build/fuzz/fuzz_blk: fuzz/fuzz_blk.c fuzz/fuzz_input.h $(CSRC)
	@mkdir -p build/fuzz
	$(CLANG) $(FUZZ_CFLAGS) fuzz/fuzz_blk.c $(filter %.c,$(CSRC)) -o $@ -lpthread -luring

fuzz-build: build/fuzz/fuzz_decoder build/fuzz/fuzz_decoder_packed build/fuzz/fuzz_datapath build/fuzz/fuzz_blk

# Each harness for FUZZ_SECONDS (split and packed decoders, default 600 each) /
# FUZZ_DATAPATH_SECONDS,
# FUZZ_JOBS processes each, then FUZZ_MESSAGES (default 1000000) generated
# vhost-user messages through the back-end; see fuzz/run_fuzz.sh.
fuzz: build fuzz-build
	PY=$(PY) bash fuzz/run_fuzz.sh

clean:
	rm -rf $(STAMPS) build inspector/_vqd*.so inspector/_vqd.c inspector/_vqd.o
