"""Run the ``deltakern`` command line and die abruptly after N shard records, like a killed job.

    python tests/_crash.py N ARGS...

The fault is injected from here, by wrapping the run directory's record writer: no hook on the
production path. ``os._exit`` skips every cleanup and flush, as SIGKILL would; exit code 75.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    limit, argv = int(sys.argv[1]), sys.argv[2:]
    from deltakern.cli import main as cli_main
    from deltakern.data.rundir import RunDir

    write_record = RunDir.write_record
    written = 0

    def write_record_then_maybe_die(self, index, record):
        nonlocal written
        write_record(self, index, record)
        written += 1
        if written >= limit:
            os._exit(75)

    RunDir.write_record = write_record_then_maybe_die
    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
