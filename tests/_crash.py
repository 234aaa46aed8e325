"""Run the ``deltakern`` command line and die abruptly at a chosen point, like a killed job.

    python tests/_crash.py FAULT ARGS...

FAULT is one of

- ``N`` or ``records:N``: die after N shard records were written;
- ``replace:GLOB``: die when a finished temporary file is about to be renamed onto a file whose
  name matches GLOB (a kill in the middle of a crash-safe write: the temporary file stays);
- ``merge:N``: die after N parts were copied into the merged parquet file (a kill during the
  final merge, with a large temporary file on disk).

The faults are injected from here, by wrapping library functions: no hook on the production
path. ``os._exit`` skips every cleanup and flush, as SIGKILL would; exit code 75.
"""

from __future__ import annotations

import fnmatch
import os
import sys

CRASH_EXIT = 75


def _after_records(limit: int) -> None:
    from deltakern.data.rundir import RunDir

    write_record = RunDir.write_record
    written = 0

    def write_record_then_maybe_die(self, index, record):
        nonlocal written
        write_record(self, index, record)
        written += 1
        if written >= limit:
            os._exit(CRASH_EXIT)

    RunDir.write_record = write_record_then_maybe_die


def _before_replace(pattern: str) -> None:
    replace = os.replace

    def replace_or_die(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern):
            os._exit(CRASH_EXIT)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die


def _during_merge(limit: int) -> None:
    import pyarrow.parquet as pq

    from deltakern.pipeline import score

    write_table = pq.ParquetWriter.write_table
    merge_parts = score.merge_parts
    merging = False
    written = 0

    def write_table_then_maybe_die(self, table, *args, **kwargs):
        nonlocal written
        write_table(self, table, *args, **kwargs)
        if merging:  # parts are written through ParquetWriter too; count only the merge
            written += 1
            if written >= limit:
                os._exit(CRASH_EXIT)

    def merge_and_count(*args, **kwargs):
        nonlocal merging
        merging = True
        return merge_parts(*args, **kwargs)

    pq.ParquetWriter.write_table = write_table_then_maybe_die
    score.merge_parts = merge_and_count


def main() -> None:
    fault, argv = sys.argv[1], sys.argv[2:]
    kind, _, value = fault.partition(":") if ":" in fault else ("records", ":", fault)
    if kind == "records":
        _after_records(int(value))
    elif kind == "replace":
        _before_replace(value)
    elif kind == "merge":
        _during_merge(int(value))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from deltakern.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
