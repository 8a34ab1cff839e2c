"""The `edgeq` command's entry point: the CLI's imports (click, the command modules) take ~0.1 s,
and a Ctrl-C in them ended in a KeyboardInterrupt traceback through the import machinery. Here it
ends as any other interrupted command: one line, exit 1."""

import sys


def main():
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(1)
    return cli()
