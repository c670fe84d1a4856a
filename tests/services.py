"""Real services on 127.0.0.1 for tests and benchmarks: the same code as the development stack
(``make stack``), which lives in :mod:`infra.stack`."""
from pathlib import Path

from infra.stack import ACCESS_KEY, SECRET_KEY, MLflowServer, RayHead, SeaweedS3, free_port

__all__ = ["ACCESS_KEY", "SECRET_KEY", "MLflowServer", "RayHead", "SeaweedS3", "free_port", "mlflow_secrets"]


def mlflow_secrets(tracking_uri: str, needles: list[str], work_dir: Path) -> list[str]:
    """Where any of ``needles`` (credentials, names of secret environment variables) occurs in what
    the MLflow store at ``tracking_uri`` holds: every run's params, tags and metric names, every
    artifact's bytes (downloaded into ``work_dir``), every logged model's tags, params and files, every
    registered model version's tags, description and source. [] when clean."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    found: list[str] = []

    def check(where: str, text) -> None:
        found.extend(f"{where}: {n!r}" for n in needles if n in str(text))

    def artifacts(run_id: str, path: str | None = None):
        for info in client.list_artifacts(run_id, path):
            yield from artifacts(run_id, info.path) if info.is_dir else [info.path]

    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    for run in client.search_runs(ids, run_view_type=ViewType.ALL, max_results=5000):
        rid = run.info.run_id
        check(f"run {rid} params", run.data.params)
        check(f"run {rid} tags", run.data.tags)
        check(f"run {rid} metrics", list(run.data.metrics))
        for path in artifacts(rid):
            local = Path(client.download_artifacts(rid, path, str(work_dir / rid)))
            check(f"run {rid} artifact {path}", local.read_bytes().decode("latin-1"))
    for model in client.search_logged_models(ids):
        check(f"logged model {model.model_id}", {**model.tags, **model.params})
        mlflow.set_tracking_uri(tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                         dst_path=str(work_dir / model.model_id)))
        for f in (p for p in local.rglob("*") if p.is_file()):
            check(f"logged model {model.model_id} artifact {f.relative_to(local)}", f.read_bytes().decode("latin-1"))
    for rm in client.search_registered_models():
        check(f"registered model {rm.name}", rm.description)
        for v in client.search_model_versions(f"name = '{rm.name}'"):
            check(f"model version {rm.name}/{v.version}", [v.tags, v.description, v.source])
    return found
