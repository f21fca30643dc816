# Thin wrapper over CMake so that the README's commands work on a fresh machine.
BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?=

.PHONY: all build test demo gpu-test bench sanitize-test clean

all: build

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	./$(BUILD)/moda demo

# On a machine with an NVIDIA GPU: every CUDA path against the CPU reference.
gpu-test: build
	bash tests/gpu/run.sh $(BUILD)

bench: build
	./$(BUILD)/moda bench

# The suite under AddressSanitizer and UndefinedBehaviorSanitizer (host code only; CUDA off).
sanitize-test:
	cmake -S . -B $(BUILD)-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMODA_CUDA=OFF -DMODA_SANITIZE=address,undefined
	cmake --build $(BUILD)-asan -j $(JOBS)
	cd $(BUILD)-asan && MODA_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD) $(BUILD)-asan
