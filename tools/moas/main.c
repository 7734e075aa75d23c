/*
 * main.c - `moas COMMAND [options]`: finds the command and runs it; `moas help`.
 *
 * Each command is one file of this directory, which starts with its usage.
 */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const command *const commands[] = {
    &moas_cmd_generate, &moas_cmd_perplexity, &moas_cmd_routes, &moas_cmd_logits,
    &moas_cmd_inspect, &moas_cmd_bench, &moas_cmd_batched_bench,
};
#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *f) {
    fputs("usage: moas COMMAND -m MODEL [options]\n"
          "\n"
          "commands:\n", f);
    for (size_t i = 0; i < N_COMMANDS; i++) {
        fprintf(f, "  %-15s%s\n", commands[i]->name, commands[i]->summary);
    }
    fputs("  help [COMMAND] this text, or a command's options\n"
          "\n"
          "moas help COMMAND (or moas COMMAND --help) lists the options a command takes;\n"
          "it refuses any other. -p is a prompt's text and -f a file of text, - for stdin.\n"
          "moas --version prints the library's version.\n"
          "\n"
          "exit status: 0 done, 1 failed (stderr says why), 2 a usage error\n", f);
}

static const command *find(const char *name) {
    for (size_t i = 0; i < N_COMMANDS; i++) {
        if (!strcmp(name, commands[i]->name)) {
            return commands[i];
        }
    }
    return NULL;
}

static void unknown_command(const char *name) {
    fprintf(stderr, "moas: unknown command '%s'\n\n", name);
    usage(stderr);
    exit(2);
}

static int is_help(const char *arg) {
    return !strcmp(arg, "help") || !strcmp(arg, "-h") || !strcmp(arg, "--help");
}

/* What a command printed must have reached stdout: a closed stdout, a full disk or a
 * reader that went away (SIGPIPE ignored) is a failure, not a silent success. */
static int finish(int status) {
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "moas: error: cannot write stdout: %s\n", strerror(errno));
        return status != 0 ? status : 1;
    }
    return status;
}

static int run_main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (!strcmp(name, "--version")) {
        if (argc > 2) {
            fprintf(stderr, "moas: --version takes no argument\n\n");
            usage(stderr);
            return 2;
        }
        printf("moas %s\n", moas_version_string());
        return 0;
    }
    if (is_help(name)) {   /* help [COMMAND], also as -h and --help */
        if (argc > 3) {
            fprintf(stderr, "moas: help takes at most one command\n\n");
            usage(stderr);
            return 2;
        }
        if (argc == 2 || is_help(argv[2])) {
            usage(stdout);
            return 0;
        }
        const command *cmd = find(argv[2]);
        if (cmd == NULL) {
            unknown_command(argv[2]);
        }
        cmd->usage(stdout);
        return 0;
    }
    const command *cmd = find(name);
    if (cmd == NULL) {
        unknown_command(name);
    }
    return cmd->run(argc - 1, argv + 1);
}

int main(int argc, char **argv) {
    return finish(run_main(argc, argv));
}
