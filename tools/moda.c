/* moda - the command-line tool: benchmark and check the operator, train / evaluate / sample the model. */
#include "commands.h"
#include "moda.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} command;

static const command commands[] = {
    {"check", moda_cmd_check, "run the operator on random inputs on every device and compare with the reference"},
    {"bench", moda_cmd_bench, "time the operator (--device cpu|cuda|all), print a table, write JSON"},
    {"demo", moda_cmd_demo, "the main job: check the operator, then train a baseline and a MoDA model side by side"},
#ifdef MODA_HAVE_MODEL
    {"train", moda_cmd_train, "train a MoDA or baseline language model"},
    {"eval", moda_cmd_eval, "validation loss and bits per byte of a checkpoint"},
    {"sample", moda_cmd_sample, "generate text from a checkpoint"},
    {"info", moda_cmd_info, "parameters, FLOPs per token and depth-buffer memory of a configuration"},
#endif
};

static void usage(FILE *f) {
    fprintf(f, "moda %s - Mixture-of-Depths Attention\n\nusage: moda <command> [options]\n\ncommands:\n",
            moda_version());
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`moda <command> --help` describes a command's options.\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("moda %s\n", moda_version());
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "moda: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
