"""`soup` and `python -m soup`. Loading torch takes seconds: a Ctrl-C or SIGTERM meanwhile exits with one
line, not an import traceback; once a command runs, both raise KeyboardInterrupt (soup.cli.SoupGroup)."""

import os
import signal


def _exit_interrupted(signum, frame):
    os.write(2, b"soup: interrupted\n")
    os._exit(130)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a signal the parent ignores stays ignored
            signal.signal(sig, _exit_interrupted)
    # Imported only now, after the handlers: importing the CLI loads torch.
    from soup.cli import main as cli_main

    try:
        cli_main()
    finally:
        # The command is over and has said how it ended: a signal while Python shuts down changes nothing.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
