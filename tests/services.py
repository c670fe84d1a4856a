"""Real services on 127.0.0.1 for tests and benchmarks: the same code as the development stack
(``make stack``), which lives in :mod:`infra.stack`."""
from infra.stack import ACCESS_KEY, SECRET_KEY, MLflowServer, RayHead, SeaweedS3, free_port

__all__ = ["ACCESS_KEY", "SECRET_KEY", "MLflowServer", "RayHead", "SeaweedS3", "free_port"]
