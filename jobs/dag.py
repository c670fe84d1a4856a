"""`ray job submit` entry point for the whole DAG (`geco run`).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.dag --config configs/paper.yaml [--set k=v ...] [--stages render,pretrain]
"""
import sys

from jobs import run


def main(argv: list[str]) -> int:
    return run(["run"], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
