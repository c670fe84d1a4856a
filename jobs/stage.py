"""`ray job submit` entry point for any one stage of the DAG (`geco run --stages STAGE`).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.stage pretrain --config configs/paper.yaml [--set k=v ...]

STAGE is any name in :data:`pipelines.dag.STAGES`, so a stage added to the DAG has its job entry
point at once. Its inputs are what `geco run` gives a stage run alone: the configured URIs and the
earlier stages' outputs where they are.
"""
import sys

from jobs import run
from pipelines.dag import STAGES


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(f"jobs.stage: name the stage first, one of {', '.join(STAGES)}: python -m jobs.stage STAGE "
              "--config CONFIG", file=sys.stderr)
        return 2
    return run(["run", "--stages", argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
