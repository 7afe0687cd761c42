"""What every entry point does with errors: a one-line message naming the culprit, no traceback,
distinct exit codes (errors.py: 2 for a UserError: bad input, config, checkpoint, tokenizer,
device, store, or a Ray cluster that cannot be used; 1: the job failed; 130: interrupted by
Ctrl-C; 143: SIGTERM). In every case finished rows are already in whole shards: rerun to resume."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable

from internlm2_tp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, JobFailed, UserError
from internlm2_tp.runtime.interrupts import Terminated, interrupt_in


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


def main_guard(main: Callable[[list[str]], int], argv: list[str],
               handle_sigterm: bool = False) -> int:
    """`handle_sigterm`: SIGTERM outside the job's own guard (connecting to Ray, shutting it
    down) unwinds like Ctrl-C, so `finally` blocks run (a local Ray is stopped) and the exit
    code is 143. Not for torchrun ranks: one blocked in a collective could not run the handler,
    and torchrun's SIGTERM must end it at once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if handle_sigterm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        try:
            return main(argv)
        except Exception as e:
            # Ray's Cython calls turn an exception raised by a signal handler into SystemError
            # chained to it: report the interrupt, not a crash.
            intr = interrupt_in(e)
            if intr is None:
                raise
            raise intr from None
    except KeyboardInterrupt:
        print("\ninterrupted: finished rows are saved; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated (SIGTERM): finished rows are saved; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_TERMINATED
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except JobFailed as e:
        print(f"job failed: {e}\nfinished rows are saved; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_FAILED
