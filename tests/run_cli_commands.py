"""Run several `fai-mf` commands in one process (one torchrun job, one start-up for all):
`python run_cli_commands.py ARGS... --next ARGS...`; exits with the largest status.

Under torchrun the process group is made here, once, and every command uses it (a process group
destroyed and made again in one process does not reliably reconnect with gloo)."""
from __future__ import annotations

import sys

from fai_mf import cli, distributed


def main(argv: list[str]) -> int:
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--next":
            commands.append([])
        else:
            commands[-1].append(arg)
    distributed.init_from_env("cpu")
    statuses = [cli.main(command) for command in commands]
    print(f"statuses {statuses}", flush=True)
    distributed.cleanup()
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
