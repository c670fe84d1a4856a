"""What a DAG stage takes and gives: typed inputs in, outputs of one shape out.

A stage is ``run(cfg, inputs, *, parent_run_id) -> StageOutputs``:

* the config says *how* to do the work; the **inputs** say *on what*: URIs that earlier stages
  produced (or the user gave), one frozen dataclass per stage. Nothing is handed over by rewriting
  the config. The DAG (:mod:`pipelines.dag`) builds a stage's inputs from earlier outputs; the CLI
  builds them from flags and defaults (e.g. :func:`pipelines.stage1.default_inputs`);
* every stage returns a :class:`StageOutputs` (or a subclass adding stage-specific extras):
  ``uris`` (name -> URI, what later stages consume), ``mlflow_run_ids`` (name -> run id: the
  stage's own run under the stage's name, its jobs' runs as ``<stage>/<job>``), ``did_work``
  (False: everything was in place already), ``seconds``, and :meth:`StageOutputs.summary` (a line
  or a few, printed by the CLI and the DAG) with :meth:`StageOutputs.note` (one line, the DAG's
  stage table).
"""
from __future__ import annotations

from dataclasses import dataclass, field


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainInputs:
    """The pretrain stage trains on the shards at ``dataset_uri``."""

    dataset_uri: str


@dataclass(frozen=True)
class Stage1Inputs:
    """Stage 1 distils the teacher at ``teacher_uri`` (a Zero123++ folder) on the shards at
    ``dataset_uri``, and bundles the reconstructor at ``reconstructor_uri`` (a .safetensors file)
    with the generator. ``teacher_uri="tiny"`` / ``reconstructor_uri=""``: a tiny random model
    (tests only). Local paths are absolute."""

    dataset_uri: str
    teacher_uri: str = ""
    reconstructor_uri: str = ""

    def task_inputs(self) -> dict[str, str]:
        """What :class:`geco.train.stage1.VSDTask` receives as ``inputs``."""
        return {"teacher": self.teacher_uri, "reconstructor": self.reconstructor_uri}


@dataclass(frozen=True)
class RegisterInputs:
    """The register stage makes the bundle at ``bundle_uri`` (a folder, s3:// prefix, ``runs:/`` or
    ``models:/`` URI) a version of the registered model with its GSO ``metrics``
    (``gso/<view set>/<metric>`` -> value; ``{}`` when nothing was evaluated). ``evaluate_run_id``:
    the evaluation run those metrics come from; ``lineage``: URIs and run ids to record beside them
    (``bundle_run_id``: the run that logged the bundle at ``weights/bundle``, registered from there)."""

    bundle_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    evaluate_run_id: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateInputs:
    """The evaluation runs the GSO protocol on ``models`` (name -> URI; names teacher, teacher_1step,
    stage1, stage2; a GECO bundle, ``runs:/``, ``models:/name@alias``, or for the teachers a Zero123++
    folder / pretrain output) and checks its objects against the training data at ``dataset_uri``
    (leakage)."""

    models: dict[str, str]
    dataset_uri: str = ""


@dataclass(frozen=True)
class PseudoGTInputs:
    """The pseudo_gt stage reads the render shards at ``dataset_uri`` and runs the teacher at
    ``teacher_uri`` (a Zero123++ folder) and the reconstructor at ``reconstructor_uri`` (a
    .safetensors file); ``""``: a tiny random model (tests only). Local paths are absolute."""

    dataset_uri: str
    teacher_uri: str = ""
    reconstructor_uri: str = ""


@dataclass(frozen=True)
class Stage2Inputs:
    """Stage 2 fine-tunes the generator of the GECO bundle at ``bundle_uri`` (stage 1's; its
    reconstructor stays frozen) against the pseudo-GT shards at ``pseudo_gt_uri`` (render shards
    work too: the same schema). Local paths are absolute."""

    pseudo_gt_uri: str
    bundle_uri: str

    def task_inputs(self) -> dict[str, str]:
        """What :class:`geco.train.stage2.Stage2Task` receives as ``inputs``."""
        return {"bundle": self.bundle_uri}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class StageOutputs:
    """What one stage did (module docstring)."""

    stage: str = ""
    uris: dict[str, str] = field(default_factory=dict)
    mlflow_run_ids: dict[str, str] = field(default_factory=dict)
    did_work: bool = True
    seconds: float = 0.0

    @property
    def mlflow_run_id(self) -> str | None:
        """The stage's own MLflow run (None: tracking off, or a no-op re-run that opened none and
        found none recorded)."""
        return self.mlflow_run_ids.get(self.stage)

    def note(self) -> str:
        """One line for the DAG's stage table."""
        return self.summary().splitlines()[0] if self.summary() else ""

    def summary(self) -> str:
        """A line or a few: what the stage did and where its outputs are."""
        lines = [f"{self.stage}: {'done' if self.did_work else 'nothing to do'} in {self.seconds:.1f} s"]
        lines += [f"  {name}: {uri}" for name, uri in sorted(self.uris.items())]
        return "\n".join(lines)
