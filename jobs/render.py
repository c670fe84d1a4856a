"""`ray job submit` entry point for the render stage with its own options (`geco render`).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.render --config configs/paper.yaml [--set k=v ...] [--force] [--retry-failed]
"""
import sys

from jobs import run


def main(argv: list[str]) -> int:
    return run(["render"], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
