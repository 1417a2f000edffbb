"""Exit codes shared by every `frozen-tune` command."""

EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
# The shell's code for a command stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
# The shell's code for a command stopped by SIGTERM (128 + 15), as `kill` and job schedulers send it.
EXIT_TERMINATED = 143
