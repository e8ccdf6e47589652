"""A checkpoint writer for the SIGKILL test: saves generation after generation, acknowledging each.

Run as ``python -m tests.store.crash_child <state dir> <generations>``; prints the number of every
generation once its write has returned (so it is on disk), one per line.  Bounded: it stops after
``<generations>`` writes even if nobody kills it.
"""

from __future__ import annotations

import sys

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from vmcloud.pool.snapshot import EncodedRecord
from vmcloud.store.checkpoint import CheckpointStore
from vmcloud.threads import synchronous_dispatch


def main(directory: str, generations: int) -> None:
    clock = Clock()
    store = CheckpointStore(FilePath(directory), dispatch=synchronous_dispatch, clock=clock)
    for generation in range(generations):
        clock.advance(1)
        store.save(
            {
                "generation": generation,
                "vms": [
                    EncodedRecord({"vmid": f"{i:05d}", "generation": generation, "state": "FREE"})
                    for i in range(2000)
                ],
            }
        )
        if store.stats().failures:
            sys.exit(f"write failed: {store.stats().last_error}")
        sys.stdout.write(f"{generation}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
