"""Joining Ray, and the pyarrow S3 filesystem Ray Data / Ray Train use: one place for each."""
from __future__ import annotations

import os

from geco import storage


def init_ray(address: str) -> None:
    """Start an embedded Ray (``"local"``) or join a cluster (``"auto"``, ``ray://...``) unless this
    process is already connected (tests, ``ray job submit`` drivers, a DAG running stages)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def s3_filesystem():
    """A pyarrow S3 filesystem for the endpoint in the standard AWS environment (Ray Data reads,
    Ray Train storage); credentials come from the same environment, never from configs, and
    timeouts/retries from :func:`geco.storage.s3_settings` (``GECO_S3_*``)."""
    import pyarrow.fs

    endpoint = storage.s3_endpoint()
    st = storage.s3_settings()  # GECO_S3_* timeouts and retries, as for boto3 (request_timeout is
    # curl's low-speed limit on Linux: no byte for that long ends the request)
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                    "connect_timeout": st.connect_timeout, "request_timeout": st.read_timeout,
                    "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=st.max_attempts)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    return pyarrow.fs.S3FileSystem(**kwargs)
