/* demo.c - `moda demo` (`make demo`), the README's main job: check the operator against the float64 reference
 * on every device present, then (when the model is built) train a small baseline and a small MoDA model side
 * by side and print both validation losses and a sample of each. */
#include "commands.h"

#include <stdio.h>
#include <string.h>

int moda_run_checks(int want_cpu, int want_cuda, int quiet);

int moda_cmd_demo(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help")) {
            printf("usage: moda demo [--data FILE] [model options]\n"
                   "  1. checks the MoDA operator on random inputs on every device against the float64 reference;\n"
                   "  2. trains a small baseline and a small MoDA model side by side and compares them.\n");
            return 0;
        }
    printf("== 1. the MoDA operator against the float64 reference, every device present ==\n");
    int rc = moda_run_checks(1, 1, 0);
#ifdef MODA_HAVE_MODEL
    printf("\n== 2. a baseline and a MoDA language model, trained side by side ==\n");
    int rc2 = moda_demo_models(argc, argv);
    return rc ? rc : rc2;
#else
    printf("\n(the language model was not built: configure with -DMODA_BUILD_MODEL=ON)\n");
    return rc;
#endif
}
