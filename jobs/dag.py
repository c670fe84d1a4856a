"""`ray job submit` entry point for the whole DAG (render -> pretrain -> stage1).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.dag --config configs/paper.yaml [--set k=v ...] [--stages render,pretrain]

Thin on purpose: the same `geco run` command, run on the cluster's driver (ray.address=auto).
"""
import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
