/* commands.h - the subcommands of the `moda` tool; each lives in its own file under tools/. Every command
 * returns a process exit code (0 success, 1 failure, 2 usage error) and prints its own usage on --help. */
#ifndef MODA_TOOLS_COMMANDS_H
#define MODA_TOOLS_COMMANDS_H

int moda_cmd_bench(int argc, char **argv);        /* tools/bench.c: dispatches --device cpu|cuda|all */
int moda_cmd_bench_cpu(int argc, char **argv);    /* tools/bench_cpu.c */
int moda_cmd_bench_cuda(int argc, char **argv);   /* tools/bench_cuda.c (prints "not built" without CUDA) */
int moda_cmd_check(int argc, char **argv);        /* tools/check.c: operator vs reference on every device */
int moda_cmd_demo(int argc, char **argv);         /* tools/demo.c: `make demo` */
#ifdef MODA_HAVE_MODEL
int moda_cmd_train(int argc, char **argv);        /* tools/train.c */
int moda_cmd_eval(int argc, char **argv);
int moda_cmd_sample(int argc, char **argv);
int moda_cmd_info(int argc, char **argv);
/* The model half of `moda demo`: trains a small baseline and MoDA model side by side (tools/train.c). */
int moda_demo_models(int argc, char **argv);
#endif

#endif
