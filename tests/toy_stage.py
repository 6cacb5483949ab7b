"""A toy sharded stage for the resume tests: shard i holds rows i*10..i*10+9 and their squares.

    python toy_stage.py STAGE_DIR ROOT NUM_SHARDS SLEEP_SECONDS [--force]
Its worker slot comes from the environment (worker_slot: SCOPE_CLAIM_SHARDS, RANK/WORLD_SIZE, SLURM).
Prints the computed shard indexes as JSON on its last line.
"""

import json
import sys
import time
from pathlib import Path

import pyarrow as pa

from scope_cli.core.shards import ShardJob, run_shards, worker_slot


def main() -> None:
    stage_dir, root, num, sleep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    force = "--force" in sys.argv

    def compute(i):
        time.sleep(sleep)
        xs = list(range(i * 10, i * 10 + 10))
        return pa.table({"x": xs, "x2": [x * x for x in xs]}), {"rows": 10, "big": sum(x >= 15 for x in xs)}

    jobs = [ShardJob(i, [], (lambda i=i: compute(i))) for i in range(num)]
    result = run_shards("toy", stage_dir, jobs, "cfg", [], root, force=force, quiet=True, worker=worker_slot(),
                        headline={"label": "big", "num": "big", "den": "rows"})
    print(json.dumps({"computed": result.computed, "skipped": result.skipped_done,
                      "locked": result.skipped_locked}))


if __name__ == "__main__":
    main()
