"""`python -m gptgen` and the `gptgen` command: a Ctrl-C is gptgen's from the first import on."""

import sys

from gptgen.signals import ctrl_c_raises_interrupted


def run() -> int:
    # The command line's imports (dataclasses build their classes with exec) took ~50 ms before main()'s own
    # handler: a Ctrl-C there printed a traceback and ended the process by SIGINT (see signals.Interrupted).
    with ctrl_c_raises_interrupted():
        try:
            from gptgen.cli import main
        except KeyboardInterrupt:
            print("\ngptgen: interrupted", file=sys.stderr)
            return 130
        return main()


if __name__ == "__main__":
    sys.exit(run())
