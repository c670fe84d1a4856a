"""`ray job submit` entry point for scheduled retraining (`geco retrain`); the KubeRay RayCronJob and
CronJob in infra/kuberay/ run it.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.retrain --config configs/paper.yaml [--set k=v ...]
"""
import sys

from jobs import run


def main(argv: list[str]) -> int:
    return run(["retrain"], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
