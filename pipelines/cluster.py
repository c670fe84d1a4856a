"""Joining Ray: one place for how every stage connects (``ray.address`` in the config)."""
from __future__ import annotations


def init_ray(address: str) -> None:
    """Start an embedded Ray (``"local"``) or join a cluster (``"auto"``, ``ray://...``) unless this
    process is already connected (tests, ``ray job submit`` drivers, a DAG running stages)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
