# libmoas - plain GNU make, no configure step.
#
#   make                 static + shared library, moas.pc, bin/moas
#   make test            everything CI runs
#   make check           the C unit tests only
#   make run             build, then generate text from the shipped model
#   make install PREFIX=/usr/local [DESTDIR=...]   /   make uninstall
#   make OPENMP=0        tests without OpenMP;  make CC=clang;  make V=1 (loud)
#   make asan            the C tests under AddressSanitizer + UBSan (own BUILD dir)
#
# Every core builds unless the command line says otherwise (make -j1, -jN): most of
# CI's time is compiling, and each SIMD kernel file takes the compiler a minute or
# more. Sub-makes share the top-level make's jobs. Only for one goal or none: goals
# named together (make clean all) run in the order given, one after the other.
ifeq ($(MAKELEVEL)$(word 2,$(MAKECMDGOALS)),0)
MAKEFLAGS += -j$(shell nproc 2>/dev/null || echo 1)
endif

# ---- version: one source of truth, the public header ----------------------------
VERSION_MAJOR := $(shell sed -n 's/^\#define MOAS_VERSION_MAJOR \([0-9]*\)/\1/p' include/moas.h)
VERSION_MINOR := $(shell sed -n 's/^\#define MOAS_VERSION_MINOR \([0-9]*\)/\1/p' include/moas.h)
VERSION_PATCH := $(shell sed -n 's/^\#define MOAS_VERSION_PATCH \([0-9]*\)/\1/p' include/moas.h)
VERSION       := $(VERSION_MAJOR).$(VERSION_MINOR).$(VERSION_PATCH)

# ---- directories ---------------------------------------------------------------
PREFIX       ?= /usr/local
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
BINDIR       ?= $(PREFIX)/bin
BUILD        ?= build
# The default build's library and CLI go to lib/ and bin/; another BUILD's stay
# inside it, so that `make BUILD=x OPENMP=0` never leaves its library where the
# default build would take it for its own (it is newer than the default objects).
LIBOUT       ?= $(if $(filter build,$(BUILD)),lib,$(BUILD)/lib)
BINOUT       ?= $(if $(filter build,$(BUILD)),bin,$(BUILD)/bin)

# ---- flags ---------------------------------------------------------------------
CFLAGS   ?= -O2 -g
OPENMP   ?= 1
WERROR   ?= 0
MOAS_CFLAGS := -std=c11 -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
               -Wpointer-arith -Wcast-align -Wformat=2 -Wundef -Wvla -Wwrite-strings \
               -D_POSIX_C_SOURCE=200809L
ifeq ($(WERROR),1)
MOAS_CFLAGS += -Werror
endif
ifeq ($(DEBUG),1)
CFLAGS      := -O0 -g
MOAS_CFLAGS += -DMOAS_DEBUG
endif
# The library starts its own threads (src/team.c). OpenMP is only for the programs
# that use it themselves: the unit tests (a caller's parallel region leading teams)
# and the kernel benchmark. OPENMP=0 builds them without it.
ifeq ($(OPENMP),1)
OMP_FLAGS := -fopenmp
endif
LIB_CFLAGS := -fPIC -fvisibility=hidden -DMOAS_BUILD -Iinclude -Isrc

ifeq ($(V),1)
Q :=
else
Q := @
endif

UNAME_S := $(shell uname -s)
SHLIB_REAL   := libmoas.so.$(VERSION)
SHLIB_SONAME := libmoas.so.$(VERSION_MAJOR)
ifeq ($(UNAME_S),Darwin)
SHLIB_LDFLAGS := -dynamiclib -install_name $(LIBDIR)/$(SHLIB_SONAME)
else
SHLIB_LDFLAGS := -shared -Wl,-soname,$(SHLIB_SONAME) -Wl,--version-script,src/libmoas.map \
                 -Wl,--no-undefined
endif

# ---- sources -------------------------------------------------------------------
LIB_SRCS := $(wildcard src/*.c)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/%.o)
DEPS     := $(LIB_OBJS:.o=.d)

STATIC_LIB := $(LIBOUT)/libmoas.a
SHARED_LIB := $(LIBOUT)/$(SHLIB_REAL)

.PHONY: all lib examples test check run install uninstall clean asan lint
all: lib $(LIBOUT)/moas.pc $(BINOUT)/moas

lib: $(STATIC_LIB) $(SHARED_LIB)

# Objects depend on the flags they were built with: building into the same BUILD with
# others (CC=clang, CFLAGS=...) rebuilds them, and moas.pc follows. The stamp is
# rewritten only when the flags change.
FLAGS_STAMP := $(BUILD)/flags
FLAGS_TEXT   = $(CC) $(CPPFLAGS) $(MOAS_CFLAGS) $(LIB_CFLAGS) $(CFLAGS) \
               $(MOREFLAGS) $(SIMD_SAN_FLAGS) / $(LIBS_PRIVATE)
.PHONY: FORCE
$(FLAGS_STAMP): FORCE
	@mkdir -p $(dir $@)
	@echo '$(strip $(FLAGS_TEXT))' | cmp -s - $@ || echo '$(strip $(FLAGS_TEXT))' > $@

$(BUILD)/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CPPFLAGS) $(MOAS_CFLAGS) $(LIB_CFLAGS) $(CFLAGS) $(MOREFLAGS) \
	    $(ARCH_FLAGS) -MMD -MP -c -o $@ $<

# SIMD kernel tables: ISA flags for these two objects only, and only when the compiler
# targets x86-64 (elsewhere the files compile to nothing). ops_select.c checks the CPU
# before any of their code runs.
ifneq ($(filter x86_64-% amd64-%,$(shell $(CC) -dumpmachine)),)
$(BUILD)/src/ops_avx2.o:   ARCH_FLAGS := -mavx2 -mfma -mf16c $(SIMD_SAN_FLAGS)
$(BUILD)/src/ops_avx512.o: ARCH_FLAGS := -mavx512f -mfma -mf16c $(SIMD_SAN_FLAGS)
endif

$(STATIC_LIB): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^

$(SHARED_LIB): $(LIB_OBJS) src/libmoas.map
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(SHLIB_LDFLAGS) $(CFLAGS) $(MOREFLAGS) $(LDFLAGS) -o $@ $(LIB_OBJS) \
	    -pthread -lm
	$(Q)ln -sf $(SHLIB_REAL) $(LIBOUT)/$(SHLIB_SONAME)
	$(Q)ln -sf $(SHLIB_REAL) $(LIBOUT)/libmoas.so

# moas.pc names the install directories, so `install` writes it again with the
# PREFIX/LIBDIR of that command line; lib/moas.pc has those of the build's.
# Libs.private: what a static consumer links besides the archive (POSIX threads are
# in glibc's libc since 2.34; -pthread names them for older C libraries).
LIBS_PRIVATE := -lm -pthread
PC_SED = sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
             -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
             -e 's|@LIBS_PRIVATE@|$(LIBS_PRIVATE)|' moas.pc.in
$(LIBOUT)/moas.pc: moas.pc.in include/moas.h Makefile $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(Q)$(PC_SED) > $@

# OPENMP= changes no object of the library, only the programs that use OpenMP
# themselves (the unit tests, the kernel benchmark): they depend on this stamp, so
# that `make check OPENMP=0` after `make check` does not run the OpenMP build again.
OMP_STAMP := $(BUILD)/omp-flags
$(OMP_STAMP): FORCE
	@mkdir -p $(dir $@)
	@echo '$(OMP_FLAGS)' | cmp -s - $@ || echo '$(OMP_FLAGS)' > $@

# ---- programs ------------------------------------------------------------------
# Programs link the static library: one self-contained binary, no rpath games.
PROG_CFLAGS := $(MOAS_CFLAGS) -Iinclude -Isrc $(CFLAGS) $(MOREFLAGS)
PROG_LIBS   := $(STATIC_LIB) -lm -pthread

# bin/moas: tools/moas/, one file per command (main.c dispatches, cli.c and options.c
# are what they share).
MOAS_CLI_SRCS := $(wildcard tools/moas/*.c)
$(BINOUT)/moas: $(MOAS_CLI_SRCS) tools/moas/cli.h $(STATIC_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) -o $@ $(MOAS_CLI_SRCS) $(PROG_LIBS) $(LDFLAGS)

# Kernel micro-benchmark, every table this CPU runs (not part of `all`).
.PHONY: bench-kernels
bench-kernels: $(BUILD)/tools/bench_kernels
	$(BUILD)/tools/bench_kernels

$(BUILD)/tools/bench_kernels: tools/bench_kernels.c src/ops.h src/f16.h $(STATIC_LIB) $(OMP_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) $(OMP_FLAGS) -o $@ tools/bench_kernels.c $(PROG_LIBS) $(LDFLAGS)

# Decode speed of two or more builds' shared libraries, interleaved in one process
# (tools/ab_decode.c; docs/PERFORMANCE.md, "How to measure"). `make test` builds it
# and runs it once, the library against itself with every token forced to MHA.
AB_DECODE := $(BUILD)/tools/ab_decode
$(AB_DECODE): tools/ab_decode.c include/moas.h
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) -o $@ tools/ab_decode.c -ldl $(LDFLAGS)

# CPU time a process spends per decoded token when its tokens come GAP ms apart
# (tools/spaced_decode.c; docs/PERFORMANCE.md, "The library's own threads"): one
# build per process, alternated by the caller. `make test` runs it once.
SPACED_DECODE := $(BUILD)/tools/spaced_decode
$(SPACED_DECODE): tools/spaced_decode.c include/moas.h
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) -o $@ tools/spaced_decode.c -ldl $(LDFLAGS)

# The benchmarks of docs/PERFORMANCE.md: random-weight models of the benchmark shapes,
# moas bench on each (JSON lines). Minutes, and the machine should be otherwise idle.
.PHONY: bench
bench: all $(BUILD)/tools/random_model
	sh tools/bench.sh $(BINOUT) $(BUILD)/tools

# Random-weight models of any shape, for benchmarks (tools/random_model.c).
RANDOM_MODEL := $(BUILD)/tools/random_model
$(RANDOM_MODEL): tools/random_model.c tests/support/tiny_model.c tests/support/gguf_writer.c \
                 $(wildcard tests/support/*.h) $(STATIC_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) -Itests -o $@ $(filter %.c,$^) $(PROG_LIBS) $(LDFLAGS)

# ---- tests ---------------------------------------------------------------------
TEST_SRCS := $(wildcard tests/*.c tests/support/*.c)
TEST_BIN  := $(BUILD)/tests/run_tests

$(TEST_BIN): $(TEST_SRCS) $(wildcard tests/*.h tests/support/*.h) $(STATIC_LIB) \
            $(OMP_STAMP)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) $(OMP_FLAGS) -DMOAS_DEBUG -Itests -o $@ $(TEST_SRCS) $(PROG_LIBS) \
	    $(LDFLAGS)

check: $(TEST_BIN)
	$(TEST_BIN)

# `make test` is what CI runs: unit tests, the Python tool tests, the CLI smoke test,
# the installed pkg-config consumer (shared and static), then the unit tests again
# built without OpenMP and without futexes (the waits of systems that have none:
# src/futex.h), and a warning-free build with the other compiler.
OTHER_CC := $(if $(findstring clang,$(CC)),gcc,clang)
test: all $(TEST_BIN) $(AB_DECODE) $(SPACED_DECODE) $(RANDOM_MODEL)
	$(TEST_BIN)
	$(AB_DECODE) -m models/pooled-rope-kjv-1k.gguf --text models/kjv-heldout.txt -d 16 -n 4 \
	    -r 2 -b 2 $(LIBOUT)/$(SHLIB_REAL) $(LIBOUT)/$(SHLIB_REAL)@0 >/dev/null
	$(SPACED_DECODE) -m models/moas-kjv.gguf -g 1 -n 20 -t 2 $(LIBOUT)/$(SHLIB_REAL) >/dev/null
	$(MAKE) --no-print-directory fuzz-replay
	$(CXX) -std=c++11 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -x c++ include/moas.h
	MOAS_RANDOM_MODEL=$(RANDOM_MODEL) MOAS_SPACED_DECODE=$(SPACED_DECODE) MOAS_AB_DECODE=$(AB_DECODE) \
	    python3 -m unittest discover -s tests/python -t . -q
	$(MAKE) --no-print-directory pytest
	$(MAKE) --no-print-directory browser
	sh tests/cli.sh $(BINOUT)/moas
	sh tests/pkgconfig.sh "$(MAKE)" "$(CC)"
	$(MAKE) --no-print-directory cpp-example
	$(MAKE) --no-print-directory rust-example
	$(MAKE) --no-print-directory consumers
	$(MAKE) --no-print-directory check OPENMP=0 BUILD=build-noomp LIBOUT=build-noomp/lib \
	    BINOUT=build-noomp/bin MOREFLAGS=-DMOAS_NO_FUTEX
	@if command -v $(OTHER_CC) >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory lib CC=$(OTHER_CC) WERROR=1 BUILD=build-$(OTHER_CC) \
	        LIBOUT=build-$(OTHER_CC)/lib; \
	else echo "*** SKIP: warning-free build with $(OTHER_CC) ($(OTHER_CC) not found) ***"; fi

# The Python package's tests (tests/python/pkg: pip install, the high-level API, the
# server) run under pytest, with the first of these interpreters that has it: Debian's
# python3-pytest is for /usr/bin/python3, which a python3 earlier in PATH may not see.
PYTEST_PYTHONS ?= python3 /usr/bin/python3
.PHONY: pytest
pytest: all
	$(Q)for py in $(PYTEST_PYTHONS); do \
	    if $$py -c 'import pytest' 2>/dev/null; then \
	        exec $$py -m pytest -q -p no:cacheprovider tests/python/pkg; fi; \
	done; echo "*** SKIP: Python package tests (pytest not found: apt-get install python3-pytest) ***"

# The server's routing view in headless Chromium (tests/browser.sh; SKIP without
# chromium, node, playwright-core in tests/browser/node_modules, or aiohttp).
.PHONY: browser
browser: lib
	$(Q)for py in $(PYTEST_PYTHONS); do \
	    if $$py -c 'import aiohttp' 2>/dev/null; then exec sh tests/browser.sh $$py; fi; \
	done; echo "*** SKIP: browser test (aiohttp not found: apt-get install python3-aiohttp) ***"

# The server under load (tools/loadtest.py, docs/SERVING.md): 64 streaming clients, some
# hanging up early, every text checked against the same request run alone. About a
# minute; `make test` runs a short one (tests/python/pkg/test_loadtest.py).
LOADTEST_MODEL ?= models/pooled-kjv-kvinit.gguf
LOADTEST_ARGS  ?= --clients 64 --requests 2 --mode routed --pool-mb 16
.PHONY: loadtest
loadtest: all
	$(Q)for py in $(PYTEST_PYTHONS); do \
	    if $$py -c 'import aiohttp' 2>/dev/null; then \
	        exec $$py tools/loadtest.py -m $(LOADTEST_MODEL) $(LOADTEST_ARGS); fi; \
	done; echo "loadtest: needs aiohttp (apt-get install python3-aiohttp)"; exit 1

# What training needs (tools/train.py, tools/kjv_corpus.py; models/README.md): Debian's
# torch with its OpenMP BLAS, and the KJV text. Only for training, never for the library.
TRAIN_PACKAGES = bible-kjv python3-torch libopenblas0-openmp
.PHONY: train-deps
train-deps:
	$(Q)if /usr/bin/python3 -c 'import torch' 2>/dev/null && command -v bible >/dev/null; then \
	    echo "train-deps: torch and bible-kjv already installed"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TRAIN_PACKAGES); fi

# The shipped model, generating from a prompt: the README's one-command demo.
MODEL ?= models/moas-kjv.gguf
run: all
	$(BINOUT)/moas generate -m $(MODEL) -p "And God said, " -n 300 --temp 0.8 --seed 1

ASAN_FLAGS := -g -O1 -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
              -fno-omit-frame-pointer
asan:
	$(MAKE) check BUILD=build-asan LIBOUT=build-asan/lib BINOUT=build-asan/bin \
	    MOREFLAGS="$(ASAN_FLAGS)"
	$(MAKE) fuzz-replay BUILD=build-asan LIBOUT=build-asan/lib BINOUT=build-asan/bin \
	    MOREFLAGS="$(ASAN_FLAGS)"
	$(MAKE) cpp-wrapper-test BUILD=build-asan LIBOUT=build-asan/lib BINOUT=build-asan/bin \
	    MOREFLAGS="$(ASAN_FLAGS)"

# ---- fuzzing, ThreadSanitizer, valgrind (docs/TESTING.md) ----------------------
#   make fuzz-replay     the committed corpus through each fuzz target, no libFuzzer
#                        (part of `make test`; `make asan` runs it instrumented)
#   make fuzz            libFuzzer binaries: clang, ASan + UBSan, in build-fuzz/
#   make fuzz-run FUZZ_SECONDS=60   each target for that long; new inputs go to
#                        build-fuzz/corpus/<target>, crashes to build-fuzz/artifacts/
#   make fuzz-merge      add what fuzz-run found (new edges only) to tests/fuzz/corpus
#   make fuzz-coverage   lines of src/ that corpus reaches (clang, llvm-cov)
#   make tsan            the C tests under ThreadSanitizer (TSAN_CC, clang by default),
#                        OPENMP=0: the library's own threads, its teams, are checked
#   make valgrind        bin/moas inspect, generate, perplexity under memcheck, OPENMP=0
.PHONY: fuzz fuzz-bins fuzz-run fuzz-replay fuzz-corpus fuzz-merge fuzz-coverage tsan valgrind
FUZZ_TARGETS := load tokenize decode state pool
FUZZ_SUPPORT := tests/support/tiny_model.c tests/support/gguf_writer.c
FUZZ_DEPS    := tests/fuzz/fuzz.h $(wildcard tests/support/*.h) $(STATIC_LIB)
# fuzz_decode drives the routed-mode API too once src/context.c implements it.
FUZZ_DEFS    := $(if $(shell grep -l moas_context_force_scheme src/context.c 2>/dev/null),-DFUZZ_ROUTED)
FUZZ_BUILD   ?= build-fuzz
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_FLAGS   ?=
FUZZ_SAN     := -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer

$(BUILD)/fuzz/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c $(FUZZ_SUPPORT) $(FUZZ_DEPS)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) $(FUZZ_DEFS) -Itests -o $@ $< tests/fuzz/replay.c $(FUZZ_SUPPORT) \
	    $(PROG_LIBS) $(LDFLAGS)

fuzz-replay: $(FUZZ_TARGETS:%=$(BUILD)/fuzz/replay_%)
	$(Q)for t in $(FUZZ_TARGETS); do \
	    $(BUILD)/fuzz/replay_$$t tests/fuzz/corpus/$$t || exit 1; done

$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_SUPPORT) $(FUZZ_DEPS)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(PROG_CFLAGS) $(FUZZ_DEFS) -Itests -fsanitize=fuzzer -o $@ $< $(FUZZ_SUPPORT) \
	    $(PROG_LIBS) $(LDFLAGS)

fuzz-bins: $(FUZZ_TARGETS:%=$(BUILD)/fuzz/fuzz_%)

# Rewrite the seed corpora from tests/fuzz/gen_corpus.c (crash-* files are kept).
fuzz-corpus: $(BUILD)/fuzz/gen_corpus
	mkdir -p $(FUZZ_TARGETS:%=tests/fuzz/corpus/%)
	$(BUILD)/fuzz/gen_corpus tests/fuzz/corpus

$(BUILD)/fuzz/gen_corpus: tests/fuzz/gen_corpus.c $(FUZZ_SUPPORT) $(FUZZ_DEPS)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(PROG_CFLAGS) -Itests -o $@ $< $(FUZZ_SUPPORT) $(PROG_LIBS) $(LDFLAGS)

# The library too is built with coverage and sanitizers, and with MOAS_DEBUG so that a
# broken internal invariant traps. The SIMD kernel files leave out clang's
# pointer-overflow check, which made src/ops_avx512.c alone take 6 minutes to compile
# (1.5 minutes without it); `make asan` (GCC's -fsanitize=undefined) still checks
# them for it. They are also built at -O0, keeping every other check: at -O1 clang
# took 5 minutes over ops_avx512.c and 2.3 over ops_avx2.c on a 2 GHz Zen 2, most of
# CI's fuzz step (9 s each at -O0); their kernels then run slower under the fuzzers.
fuzz:
	$(MAKE) --no-print-directory fuzz-bins CC=$(FUZZ_CC) OPENMP=0 BUILD=$(FUZZ_BUILD) \
	    LIBOUT=$(FUZZ_BUILD)/lib BINOUT=$(FUZZ_BUILD)/bin \
	    MOREFLAGS="-g -O1 -DMOAS_DEBUG -fsanitize=fuzzer-no-link $(FUZZ_SAN)" \
	    SIMD_SAN_FLAGS="-fno-sanitize=pointer-overflow -O0"

fuzz-run: fuzz
	for t in $(FUZZ_TARGETS); do \
	    dict=tests/fuzz/fuzz_$$t.dict; [ -f $$dict ] && dict=-dict=$$dict || dict=; \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/artifacts/$$t && \
	    $(FUZZ_BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	        -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t/ $$dict \
	        $(FUZZ_FLAGS) $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t || exit 1; \
	done

# Add to the committed corpus the inputs fuzz-run found that reach new edges (libFuzzer
# names them by their SHA-1); review the size before committing.
fuzz-merge: fuzz
	for t in $(FUZZ_TARGETS); do \
	    $(FUZZ_BUILD)/fuzz/fuzz_$$t -merge=1 -use_counters=0 tests/fuzz/corpus/$$t \
	        $(FUZZ_BUILD)/corpus/$$t || exit 1; \
	done

# Which lines of src/ the corpus reaches (clang source coverage, llvm-cov): the
# committed corpus plus whatever fuzz-run added in $(FUZZ_BUILD)/corpus/.
LLVM_PROFDATA ?= llvm-profdata
LLVM_COV      ?= llvm-cov
fuzz-coverage:
	$(MAKE) --no-print-directory $(FUZZ_TARGETS:%=build-cov/fuzz/replay_%) CC=clang OPENMP=0 \
	    BUILD=build-cov LIBOUT=build-cov/lib BINOUT=build-cov/bin \
	    MOREFLAGS="-g -O0 -fprofile-instr-generate -fcoverage-mapping"
	rm -f build-cov/*.profraw
	for t in $(FUZZ_TARGETS); do \
	    extra=$(FUZZ_BUILD)/corpus/$$t; [ -d $$extra ] || extra=; \
	    LLVM_PROFILE_FILE=build-cov/$$t.profraw build-cov/fuzz/replay_$$t \
	        tests/fuzz/corpus/$$t $$extra || exit 1; \
	done
	$(LLVM_PROFDATA) merge -o build-cov/fuzz.profdata build-cov/*.profraw
	$(LLVM_COV) report build-cov/fuzz/replay_load $(FUZZ_TARGETS:%=-object build-cov/fuzz/replay_%) \
	    -instr-profile=build-cov/fuzz.profdata $(LIB_SRCS)

TSAN_CC ?= clang
TSAN_FLAGS := -g -O1 -fsanitize=thread -fno-omit-frame-pointer
tsan:
	TSAN_OPTIONS="halt_on_error=1 $$TSAN_OPTIONS" $(MAKE) --no-print-directory check \
	    CC=$(TSAN_CC) OPENMP=0 BUILD=build-tsan-$(TSAN_CC) LIBOUT=build-tsan-$(TSAN_CC)/lib \
	    BINOUT=build-tsan-$(TSAN_CC)/bin MOREFLAGS="$(TSAN_FLAGS)"

# The shipped model when it is there, else the tiny test model; the text is the plain
# ASCII first five verses of tests/data/tiny.txt, which both vocabularies cover.
VALGRIND       ?= valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=all \
                  --show-leak-kinds=all --quiet
VALGRIND_ERR   ?= valgrind --error-exitcode=99 --leak-check=full \
                  --errors-for-leak-kinds=definite,indirect,possible --quiet \
                  --suppressions=tests/valgrind.supp
VALGRIND_MODEL ?= $(firstword $(wildcard models/moas-kjv.gguf) tests/data/tiny-moas-bias.gguf)
VALGRIND_TEXT  ?= build-valgrind/genesis.txt
valgrind:
	$(MAKE) --no-print-directory build-valgrind/bin/moas OPENMP=0 BUILD=build-valgrind \
	    LIBOUT=build-valgrind/lib BINOUT=build-valgrind/bin
	head -n 5 tests/data/tiny.txt > build-valgrind/genesis.txt
	$(VALGRIND) build-valgrind/bin/moas inspect -m $(VALGRIND_MODEL) >/dev/null
	@# perplexity, the longest run (about two minutes), on the second core beside the
	@# others: generation, written to a prompt cache and read back from it; then the KV
	@# pool: batched decode, forks of a shared prompt, and a pool filled to refusal with
	@# compaction
	$(VALGRIND) build-valgrind/bin/moas perplexity -m $(VALGRIND_MODEL) -f $(VALGRIND_TEXT) \
	    >/dev/null & ppl=$$!; \
	$(VALGRIND) build-valgrind/bin/moas generate -m $(VALGRIND_MODEL) -p "And God said" -n 60 \
	    --seed 1 >/dev/null && \
	rm -f build-valgrind/prompt.cache && \
	$(VALGRIND) build-valgrind/bin/moas generate -m $(VALGRIND_MODEL) -p "And God" -n 8 \
	    --prompt-cache build-valgrind/prompt.cache --prompt-cache-all >/dev/null && \
	$(VALGRIND) build-valgrind/bin/moas generate -m $(VALGRIND_MODEL) -p "And God said" -n 8 \
	    --prompt-cache build-valgrind/prompt.cache >/dev/null && \
	$(VALGRIND) build-valgrind/bin/moas batched-bench -m models/pooled-kjv-kvinit.gguf -npp 24 \
	    -ntg 8 -npl 1,3 --shared-prompt --mode routed --json >/dev/null && \
	$(VALGRIND) build-valgrind/bin/moas batched-bench -m models/pooled-kjv-kvinit.gguf -npp 24 \
	    -ntg 8 --pool-mb 0.3 --mode routed --compact-keep 4 --json >/dev/null; rest=$$?; \
	wait $$ppl && test $$rest -eq 0
	@# Error paths must exit 1 (the program's own failure), not 99 (a memcheck error).
	@# The program exit()s from deep inside, so blocks its frames still point to are
	@# "still reachable" there, and only lost blocks count.
	head -c 3000 $(VALGRIND_MODEL) > build-valgrind/cut.gguf
	$(VALGRIND_ERR) build-valgrind/bin/moas generate -m build-valgrind/cut.gguf -p "A" \
	    2>build-valgrind/err.txt; test $$? -eq 1 || { cat build-valgrind/err.txt; exit 1; }
	$(VALGRIND_ERR) build-valgrind/bin/moas generate -m $(VALGRIND_MODEL) -p "And \`" \
	    2>build-valgrind/err.txt; test $$? -eq 1 || { cat build-valgrind/err.txt; exit 1; }
	@echo "valgrind: clean"

# ---- install -------------------------------------------------------------------
install: all
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR) \
	    $(DESTDIR)$(BINDIR)
	install -m 644 include/moas.h $(DESTDIR)$(INCLUDEDIR)/moas.h
	install -m 644 examples/cpp/moas.hpp $(DESTDIR)$(INCLUDEDIR)/moas.hpp
	install -m 644 $(STATIC_LIB) $(DESTDIR)$(LIBDIR)/libmoas.a
	install -m 755 $(SHARED_LIB) $(DESTDIR)$(LIBDIR)/$(SHLIB_REAL)
	ln -sf $(SHLIB_REAL) $(DESTDIR)$(LIBDIR)/$(SHLIB_SONAME)
	ln -sf $(SHLIB_REAL) $(DESTDIR)$(LIBDIR)/libmoas.so
	$(PC_SED) > $(BUILD)/moas.pc.install
	install -m 644 $(BUILD)/moas.pc.install $(DESTDIR)$(PKGCONFIGDIR)/moas.pc
	install -m 755 $(BINOUT)/moas $(DESTDIR)$(BINDIR)/moas
	@echo "The Python package (it finds this library through pkg-config or MOAS_LIBRARY):"
	@echo "    python3 -m pip install --no-build-isolation --no-index ./bindings/python"

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/moas.h $(DESTDIR)$(INCLUDEDIR)/moas.hpp $(DESTDIR)$(LIBDIR)/libmoas.a \
	    $(DESTDIR)$(LIBDIR)/$(SHLIB_REAL) $(DESTDIR)$(LIBDIR)/$(SHLIB_SONAME) \
	    $(DESTDIR)$(LIBDIR)/libmoas.so $(DESTDIR)$(PKGCONFIGDIR)/moas.pc \
	    $(DESTDIR)$(BINDIR)/moas

# ---- other languages, consumers, ABI baseline (docs/API.md) ---------------------
#   make cpp-example     examples/cpp/generate.cpp, parallel.cpp and
#                        tests/test_cpp_wrapper.cpp (RAII header moas.hpp), -std=c++17
#                        -Werror, run
#   make rust-example    bindings/rust (crates moas-sys, moas): cargo build + test, offline,
#                        then tests/rust-consumer, a crate depending on them by path, static
#                        and dynamic (SKIP when cargo is absent)
#   make consumers       C++, Rust and Python against an installed prefix found by pkg-config
#   make abi-check       lib/libmoas.so's ABI against abi/libmoas.abi (abigail-tools)
#   make abi-update      rewrite abi/libmoas.abi; refuses an incompatible change without a
#                        new SONAME major (ABI_FORCE=1 overrides)
.PHONY: cpp-example rust-example consumers abi-check abi-update
EXAMPLE_MODEL := tests/data/tiny-moas-bias.gguf
CARGO ?= $(firstword $(shell command -v cargo 2>/dev/null) $(wildcard $(HOME)/.cargo/bin/cargo))
CPP_EXAMPLE := $(BUILD)/examples/cpp/generate

$(CPP_EXAMPLE): examples/cpp/generate.cpp examples/cpp/moas.hpp include/moas.h $(STATIC_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CXX     $@")
	$(Q)$(CXX) -std=c++17 -Wall -Wextra -Werror -Iinclude $(CFLAGS) $(MOREFLAGS) -o $@ \
	    examples/cpp/generate.cpp $(PROG_LIBS) $(LDFLAGS)

CPP_PARALLEL := $(BUILD)/examples/cpp/parallel
$(CPP_PARALLEL): examples/cpp/parallel.cpp examples/cpp/moas.hpp include/moas.h $(STATIC_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CXX     $@")
	$(Q)$(CXX) -std=c++17 -Wall -Wextra -Werror -Iinclude $(CFLAGS) $(MOREFLAGS) -o $@ \
	    examples/cpp/parallel.cpp $(PROG_LIBS) $(LDFLAGS)

# examples/cpp/moas.hpp's own guarantees: lifetimes, sizes, moved-from objects
CPP_WRAPPER_TEST := $(BUILD)/tests/test_cpp_wrapper
$(CPP_WRAPPER_TEST): tests/test_cpp_wrapper.cpp examples/cpp/moas.hpp include/moas.h $(STATIC_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CXX     $@")
	$(Q)$(CXX) -std=c++17 -Wall -Wextra -Werror -Iinclude -Iexamples/cpp $(CFLAGS) $(MOREFLAGS) \
	    -o $@ tests/test_cpp_wrapper.cpp $(PROG_LIBS) $(LDFLAGS)

.PHONY: cpp-wrapper-test
cpp-wrapper-test: $(CPP_WRAPPER_TEST)
	$(Q)$(CPP_WRAPPER_TEST) $(EXAMPLE_MODEL)

cpp-example: $(CPP_EXAMPLE) $(CPP_PARALLEL) $(CPP_WRAPPER_TEST)
	$(Q)$(CPP_WRAPPER_TEST) $(EXAMPLE_MODEL)
	$(Q)sh tests/consumers.sh run-example cpp-example $(CPP_EXAMPLE)
	$(Q)sh tests/consumers.sh usage "cpp parallel" $(CPP_PARALLEL)
	$(Q)$(CPP_PARALLEL) $(EXAMPLE_MODEL) "And God" 4 12 >/dev/null && echo "cpp parallel: ok (forks in one pool equal decoding alone, and so does a saved state loaded elsewhere)"
	$(Q)$(CPP_PARALLEL) tests/data/tiny-modern-pooled-nobias.gguf "And God" 4 12 >/dev/null 2>&1 && echo "cpp parallel: ok on a pooled RoPE model (compaction's exact count and bytes, forks untouched, shift)"

rust-example: lib $(LIBOUT)/moas.pc
	$(Q)if [ -z "$(CARGO)" ]; then echo "*** SKIP: rust example (cargo not found) ***"; exit 0; fi; \
	export CARGO_TARGET_DIR=$(abspath $(BUILD))/rust MOAS_LIB_DIR=$(abspath $(LIBOUT)) && \
	(cd bindings/rust && { ! $(CARGO) fmt --version >/dev/null 2>&1 || \
	  $(CARGO) fmt --check >/dev/null || \
	  { echo "bindings/rust: not as rustfmt formats it (cargo fmt --check)"; exit 1; }; } && \
	 $(CARGO) build --offline -q --all-targets && \
	 $(CARGO) test --offline -q >$(abspath $(BUILD))/rust/test.log 2>&1 || \
	 { cat $(abspath $(BUILD))/rust/test.log; exit 1; }) && \
	grep -h "^test result" $(abspath $(BUILD))/rust/test.log | sed 's/^/bindings\/rust: /' && \
	sh tests/consumers.sh run-example rust-example $(abspath $(BUILD))/rust/debug/examples/generate && \
	sh tests/consumers.sh rust-consumer $(CARGO) $(abspath $(BUILD))/rust-consumer

consumers: all
	$(Q)sh tests/consumers.sh all "$(MAKE)" "$(CXX)" "$(CARGO)"

abi-check: lib
	$(Q)sh tools/abi.sh check $(SHARED_LIB) abi/libmoas.abi abi/libmoas.suppr

abi-update: lib
	$(Q)sh tools/abi.sh update $(SHARED_LIB) abi/libmoas.abi abi/libmoas.suppr

# No exit/abort/printing in the library, and every public function documented.
lint:
	@! grep -nE '\b(exit|abort|printf|fprintf|puts|assert)\(' src/*.c src/*.h \
	    | grep -v 'snprintf\|vsnprintf' || { echo "lint: forbidden call in src/"; exit 1; }
	@echo "lint: ok"

# The build's own directories: the default one's also takes the sub-builds of `make
# test` (build-*) and lib/, bin/ with it; another BUILD= only itself (its lib/ and
# bin/ inside it), and LIBOUT=, BINOUT= when they are named.
clean:
	rm -rf $(BUILD) $(if $(filter build,$(BUILD)),build-* $(LIBOUT) $(BINOUT),\
	    $(if $(filter-out file,$(origin LIBOUT)),$(LIBOUT)) \
	    $(if $(filter-out file,$(origin BINOUT)),$(BINOUT)))

-include $(DEPS)
