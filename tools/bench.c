/* bench.c - `moda bench`: dispatches to the CPU and CUDA benchmarks (tools/bench_cpu.c, tools/bench_cuda.c). */
#include "commands.h"

#include <stdio.h>
#include <string.h>

int moda_cmd_bench(int argc, char **argv) {
    const char *device = "all";
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--device") && i + 1 < argc) device = argv[i + 1];
    if (!strcmp(device, "cpu")) return moda_cmd_bench_cpu(argc, argv);
    if (!strcmp(device, "cuda")) return moda_cmd_bench_cuda(argc, argv);
    if (!strcmp(device, "all")) {
        int rc = moda_cmd_bench_cpu(argc, argv);
        int rc2 = moda_cmd_bench_cuda(argc, argv);
        return rc ? rc : rc2;
    }
    fprintf(stderr, "moda bench: --device must be cpu, cuda or all, not '%s'\n", device);
    return 2;
}
