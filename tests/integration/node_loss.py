"""Driver for tests/integration/test_node_loss.py, run in a process of its own (it owns a whole
multi-node Ray): ``python -m tests.integration.node_loss OUT_DIR`` prints one JSON line.

A ``ray.cluster_utils.Cluster`` (a head and two worker raylets on this machine, loopback only):

1. render 8 procedural objects with two render actors (0.75 CPU each: at most one per node); once the
   first shard is committed, one worker node is removed without warning (its raylet, its render
   actor and its Blender die) and a fresh node joins, as an autoscaler would replace it;
2. train the reconstructor with two Ray Train workers (0.75 CPU each: at least one off the head) on the rendered shards; after
   step 3 (checkpoint at step 2) every rank holds (``GECO_TEST_FAULTS=hold-at-step``), the node of a
   rank that is not on the head is removed and a fresh one joins.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(out: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from geco.config import load_config
    from geco.data import shards
    from geco.faults import ENV as FAULT_ENV
    from pipelines import pretrain, render
    from tests.integration.test_dag import MODELS

    result: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    # four worker nodes: two to lose, and spares standing in for the replacements an autoscaler would
    # add (a node cannot be added from the watcher thread: Ray installs signal handlers)
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(4)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        data = str(out / "shards")
        base = MODELS + [
            "source.kind=procedural", "source.num_procedural=8", "render.cond.resolution=32",
            "render.zero123.resolution=32", "render.random.count=1", "render.random.resolution=32",
            "render.blender.samples=2", "render.blender.threads=1", "dataset.samples_per_shard=1",
            "dataset.val_fraction=0.3", "ray.address=auto", "ray.num_renderers=2", "ray.cpus_per_renderer=0.75",
            f"dataset.uri={data}", f"cache.dir={out / 'cache'}", "tracking.enabled=false"]

        # 1. a worker node lost mid-render ------------------------------------------------------
        def lose_a_render_node() -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                done = len(shards.committed_state(data)["objects"]) if Path(data).exists() else 0
                free = ray._private.state.available_resources_per_node()  # noqa: SLF001
                busy = [i for i, n in enumerate(workers) if free.get(n.node_id, {}).get("CPU", 1.0) < 1.0]
                if done >= 1 and busy:  # a node with a render actor on it
                    result["render_committed_when_lost"] = done
                    cluster.remove_node(workers.pop(busy[0]), allow_graceful=False)
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=_recording(result, lose_a_render_node), daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        res = render.run(load_config(None, base))
        watcher.join(timeout=60)
        result["render"] = {"rendered": res.rendered, "failed": res.failed, "seconds": time.perf_counter() - t0}

        # 2. a worker node lost mid-training ----------------------------------------------------
        holds = out / "holds"
        os.environ[FAULT_ENV] = f"hold-at-step:3:{holds}"
        head_id = cluster.head_node.node_id

        def lose_a_training_node() -> None:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                # each holds "pid <pid> <json>" (geco.faults.once)
                marks = [json.loads(p.read_text().split(" ", 2)[2]) for p in holds.glob("rank-*")]
                if len(marks) == 2:
                    victim = next(m for m in sorted(marks, key=lambda m: -m["rank"]) if m["node_id"] != head_id)
                    node = next(n for n in workers if n.node_id == victim["node_id"])
                    result["train_lost_rank"] = victim["rank"]
                    workers.remove(node)
                    cluster.remove_node(node, allow_graceful=False)
                    return
                time.sleep(0.1)

        watcher = threading.Thread(target=_recording(result, lose_a_training_node), daemon=True)
        watcher.start()
        job = {"steps": 6, "checkpoint_every": 2, "eval_every": 0, "num_workers": 2, "batch_size": 1,
               "cpus_per_worker": 0.75, "max_failures": 2, "log_every": 1, "torch_threads": 1, "keep_checkpoints": 2,
               "storage_path": out / "train"}
        cfg = load_config(None, base + [f"pretrain.output_uri={out / 'pretrained'}", "pretrain.targets=[reconstructor]",
                                        "pretrain.concurrent=false", "models.reconstructor.input_size=16"]
                          + [f"pretrain.reconstructor.{k}={v}" for k, v in job.items()])
        t0 = time.perf_counter()
        r = pretrain.run(cfg).results["reconstructor"]
        watcher.join(timeout=60)
        result["train"] = {"step": r.step, "resumed_from": r.resumed_from, "seconds": time.perf_counter() - t0}
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


def _recording(result: dict, watch):
    """``watch``, with any error it raises kept in ``result["errors"]`` (a thread's exception is
    otherwise only printed, and the test would see a node that was simply never lost)."""
    def run() -> None:
        try:
            watch()
        except Exception as e:  # noqa: BLE001 - reported through the result
            result.setdefault("errors", []).append(f"{watch.__name__}: {type(e).__name__}: {e}")
    return run


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(json.dumps(main(out)), flush=True)
    sys.stdout.flush()
    os._exit(0)  # Blender's exit-time segfault must not decide the status (DESIGN.md)
