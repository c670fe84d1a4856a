"""`ray job submit` entry point for the render stage.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.render --config configs/paper.yaml [--set k=v ...] [--force]

Thin on purpose: the same `geco render` command, run on the cluster's driver (ray.address=auto).
"""
import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
