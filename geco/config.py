"""Typed configuration for every stage of the GECO DAG.

One flat, documented model per concern, loaded from YAML in ``configs/`` and validated before any
work starts. Command-line overrides use dotted paths: ``--set render.blender.samples=32``.

An error names the file, the field and what is allowed, e.g.::

    configs/local.yaml: render.blender.samples: Input should be greater than or equal to 1 (got 0)

Files are UTF-8 YAML; a key given twice in one mapping is an error (plain YAML would keep the last
one silently), as is a file that is not UTF-8: each is one line naming the file and the line.
Angles are degrees (elevations within [-90, 90]); distances, angles and timeouts are finite.
Storage (S3 endpoint, credentials, timeouts) is configured from the environment, never here:
see geco/storage.py.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the file and the field."""


class _Strict(BaseModel):
    # Unknown keys are typos: reject them rather than silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Object sources
# --------------------------------------------------------------------------------------------
class SourceConfig(_Strict):
    # auto (default): detected from `uri` — empty or procedural:// -> procedural, a .txt/.csv file
    # -> objaverse, a folder/prefix of <name>/meshes/model.obj -> gso, any other folder or s3://
    # prefix -> dir. Or set one explicitly (a kind is a module of geco/sources/):
    # dir: a local directory or s3:// prefix of .glb/.gltf/.obj files (+ .mtl and textures).
    # objaverse: a local or s3:// text file with one Objaverse UID per line.
    # gso: a Google Scanned Objects folder (<name>/meshes/model.obj).
    # procedural: textured objects generated in code (tests and the embedded demo).
    kind: str = "auto"
    uri: str = ""
    # procedural only: how many objects to generate.
    num_procedural: int = Field(8, ge=1)
    # Keep at most this many objects (0 = all), taken in sorted id order: a cheap way to subset.
    limit: int = Field(0, ge=0)
    # Objaverse only: a local folder used as the objaverse package's download cache (its on-disk
    # layout `hf-objaverse-v1/glbs/<group>/<uid>.glb`); empty = the package's default (~/.objaverse).
    objaverse_cache: str = ""
    # Skip objects whose licence is in this list (e.g. ["by-nc", "by-nc-sa"]); case-insensitive.
    exclude_licenses: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _kind_and_uri(self) -> "SourceConfig":
        from geco.sources import AUTO, KINDS  # the registry of kinds (geco.sources imports this module)

        if self.kind != AUTO and self.kind not in KINDS:
            raise ValueError(f"source.kind={self.kind!r}: choose auto or one of {', '.join(sorted(KINDS))}")
        if self.kind not in (AUTO, "procedural") and not self.uri:
            raise ValueError(f"source.uri is required for source.kind={self.kind!r}")
        return self


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
# An elevation in degrees: a camera above (+) or below (-) the xy plane, up to the poles.
Elevation = Annotated[float, Field(ge=-90.0, le=90.0)]


class _FiniteStrict(_Strict):
    # inf/nan are never a distance, an angle or a timeout (YAML spells them .inf / .nan).
    model_config = ConfigDict(allow_inf_nan=False)


class CondViewConfig(_FiniteStrict):
    """The single conditioning view per object (the teacher's input image)."""

    fov_deg: float = Field(49.1, gt=0, lt=180)  # full field of view across the image width
    radius: float = Field(1.5, gt=0)  # camera distance from the origin (object in [-0.5, 0.5]^3)
    resolution: int = Field(512, ge=8)  # square image side in pixels
    elevation_range: tuple[Elevation, Elevation] = (-10.0, 40.0)  # degrees, uniform; azimuth uniform


class Zero123ViewsConfig(_FiniteStrict):
    """The 6 Zero123++ target views: azimuth relative to the conditioning view, elevation absolute."""

    fov_deg: float = Field(30.0, gt=0, lt=180)
    radius: float = Field(2.0, gt=0)
    resolution: int = Field(320, ge=8)  # one grid tile
    elevations: tuple[Elevation, Elevation] = (20.0, -10.0)  # alternating, v1.2 (v1.1: 30/-20)


class RandomViewsConfig(_FiniteStrict):
    """N random supervision views per object."""

    count: int = Field(8, ge=0)
    fov_deg: float = Field(49.1, gt=0, lt=180)
    radius: float = Field(1.5, gt=0)
    resolution: int = Field(256, ge=8)
    elevation_range: tuple[Elevation, Elevation] = (-20.0, 50.0)  # degrees, uniform; azimuth uniform


class BlenderConfig(_FiniteStrict):
    """How Blender renders: engine, quality, device, and per-object limits."""

    engine: Literal["CYCLES", "BLENDER_EEVEE_NEXT"] = "CYCLES"
    samples: int = Field(16, ge=1)  # Cycles samples per pixel
    device: Literal["CPU", "CUDA", "OPTIX"] = "CPU"  # Cycles compute device
    denoiser: Literal["INTEL", "OPTIX", "NONE"] = "NONE"
    threads: int = Field(0, ge=0)  # Cycles CPU threads per renderer (0 = all cores)
    timeout_s: float = Field(300.0, gt=0)  # per object; a renderer past it is killed and restarted
    max_objects_per_process: int = Field(500, ge=1)  # recycle a Blender process after this many
    light_strength: float = Field(1.0, gt=0)  # uniform world (ambient) light strength


class RenderConfig(_FiniteStrict):
    cond: CondViewConfig = CondViewConfig()
    zero123: Zero123ViewsConfig = Zero123ViewsConfig()
    random: RandomViewsConfig = RandomViewsConfig()
    blender: BlenderConfig = BlenderConfig()
    seed: int = 0  # random poses are seeded from hash(object id, seed): re-renders are identical
    depth: bool = True  # write NNN.depth.npy (camera z-depth, float16, 0 where no surface)
    normals: bool = True  # write NNN.normal.png (world-space normals as (n+1)/2)

    def settings_hash(self) -> str:
        """A short hash of everything that changes the pixels (not timeouts or process limits)."""
        d = self.model_dump(mode="json")
        for k in ("timeout_s", "max_objects_per_process", "threads"):
            d["blender"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Dataset, cache, Ray, tracking
# --------------------------------------------------------------------------------------------
class DatasetConfig(_Strict):
    """Where the shards live and how they are cut."""

    uri: str = "outputs/shards"  # local dir or s3://bucket/prefix for shards, manifest, failures
    samples_per_shard: int = Field(64, ge=1)  # objects per shard-NNNNNN.tar
    val_fraction: float = Field(0.02, ge=0, lt=1)  # validation split, by hash of the object id
    # Training input: "stream" re-reads the shards every epoch (any size); "materialize" reads the
    # train split once into Ray's object store (no read work competing with training after that);
    # "auto" materializes when the split's shards take under a quarter of the object store.
    training_input: Literal["auto", "stream", "materialize"] = "auto"
    # A render removes temporaries of killed shard writers (e.g. .shard-000003.tar.tmp-*, incomplete
    # S3 uploads): at once when their writer's pid on this host is gone, else once untouched this long.
    stale_temp_hours: float = Field(24.0, gt=0)
    # Held-out objects for the training stages' evaluation when the manifest's val split is empty
    # (chosen by a hash of the object id, so always the same ones); one value for every stage.
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    # Before training, every shard's size is checked against the manifest's record; this also checks
    # its sha256 (reads every shard once: for data copied between stores).
    verify_hashes: bool = False


class JobLimitsConfig(_Strict):
    """When a render job gives up: mostly-failing objects mean a broken install, not bad objects."""

    max_failure_rate: float = Field(0.5, gt=0, le=1)  # abort above this fraction of failures ...
    min_attempts: int = Field(8, ge=1)  # ... once at least this many objects were attempted


class CacheConfig(_Strict):
    dir: str = ""  # per-node cache of raw objects fetched from S3/Objaverse ("" = system temp)
    max_gb: float = Field(20.0, gt=0)  # size cap; least recently used files are evicted


class RayConfig(_Strict):
    address: str = "local"  # "local" starts an embedded Ray; "auto" joins a running cluster
    num_renderers: int = Field(1, ge=1)  # long-lived Blender actors
    cpus_per_renderer: float = Field(1.0, gt=0)  # fractional on small machines (Ray Data needs CPUs too)
    gpus_per_renderer: float = Field(0.0, ge=0)


class TrackingConfig(_Strict):
    # MLflow tracking URI: a sqlite file (embedded default) or an http(s) server.
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "geco"
    enabled: bool = True
    # where a *new* experiment keeps its artifacts (local folder, s3://, ...); "" = the server's default,
    # or for a sqlite store a folder `mlartifacts` beside the .db file (not ./mlruns of whatever the cwd is)
    artifact_location: str = ""
    contact_sheet_objects: int = Field(4, ge=0)  # rendered objects shown in the contact sheet
    # a RUNNING run of another host (or one without an owner tag) whose name a new run takes is marked
    # KILLED only when it started more than this many hours ago; 0: never (runs of this host: when gone)
    stale_run_hours: float = Field(0.0, ge=0)


# --------------------------------------------------------------------------------------------
# Models (issue: models and inference). Each section: real weights from `pretrained` (a local
# folder or s3:// prefix in the upstream layout), or — when empty — a tiny randomly initialised
# model of the same classes, sized by the `tiny` fields (tests and the embedded demo).
# --------------------------------------------------------------------------------------------
class TeacherConfig(_Strict):
    """Zero123++-style multi-view diffusion teacher (UPSTREAM.md)."""

    pretrained: str = ""  # folder/prefix in the sudo-ai/zero123plus-v1.2 layout; "" = tiny random
    unet: str = ""  # optional UNet replacing the folder's (e.g. InstantMesh's white-background fine-tune)
    tile_size: int = Field(320, ge=8)  # one view tile in pixels; the grid is 3 rows x 2 columns
    cond_size: int = Field(512, ge=8)  # condition image side fed to the VAE (feature_extractor_vae)
    guidance_scale: float = Field(4.0, ge=1.0)  # classifier-free guidance
    num_inference_steps: int = Field(75, ge=1)  # sampling steps (Zero123++ default 28; GECO 75)
    sampler: Literal["euler_ancestral", "ddim"] = "euler_ancestral"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # inference timestep spacing for both samplers (Zero123++ recommends "trailing")
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    # how cond_lat is drawn from the VAE posterior of the condition image (upstream: "sample")
    cond_latent: Literal["sample", "mode"] = "sample"
    # CFG-unconditional condition image, grey level in [0, 1]: 0.5 = zeros after (x-0.5)/0.8, as
    # Zero123++ does; InstantMesh's fine-tune dropped the condition with black (0.0) instead
    uncond_image_value: float = Field(0.5, ge=0.0, le=1.0)
    # keep the CLIP text encoder + tokenizer in memory after encoding "" (False frees ~1.3 GB;
    # save_teacher then copies text_encoder/ and tokenizer/ from the folder the teacher came from)
    keep_text_encoder: bool = False
    # local cache for an s3:// `pretrained` or `unet` ("" = ~/.cache/geco/teacher)
    cache_dir: str = ""
    # tiny architecture, used only when `pretrained` is empty
    tiny_block_out_channels: tuple[int, ...] = (32, 64)
    tiny_layers_per_block: int = 1
    tiny_cross_attention_dim: int = 32
    tiny_attention_head_dim: int = 8
    tiny_vae_channels: tuple[int, ...] = (16, 32)
    tiny_clip_hidden: int = 32
    tiny_clip_layers: int = 2
    tiny_clip_image_size: int = 32


class GeneratorConfig(_Strict):
    """One-step generator G: the teacher's UNet at a fixed timestep, v -> x0 (UPSTREAM.md)."""

    pretrained: str = ""  # a trained generator checkpoint (diffusers UNet folder); "" = copy of the teacher
    timestep: int = Field(950, ge=1, le=999)  # t*: pure noise in, x0 out
    scale_input_by_sigma: bool = True  # feed z * sigma_t (True) or z itself (False)


class LGMConfig(_Strict):
    """``models.reconstructor.lgm``: LGM's asymmetric multi-view U-Net (geco/models/reconstructors/lgm.py).

    Defaults are LGM "big" (64,128,256,512,1024,1024 down; 1024,1024,512,256,128 up), the layout of
    its released ``model_fp16_fixrot.safetensors``."""

    down_channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 1024)
    down_attention: tuple[bool, ...] = (False, False, False, True, True, True)
    up_channels: tuple[int, ...] = (1024, 1024, 512, 256, 128)
    up_attention: tuple[bool, ...] = (True, True, True, False, False)
    num_heads: int = Field(16, ge=1)
    mid_attention: bool = True  # attention between the two mid-block ResNets (LGM: True)
    layers_per_block: int = Field(2, ge=1)  # ResNets per down block; up blocks get one more (LGM: 2)
    norm_groups: int = Field(32, ge=1)  # GroupNorm groups (LGM: 32); tiny configs need fewer
    # "first_view": rotate the cameras so view 0 sits at LGM's canonical pose (as LGM trains and GECO
    # infers); "absolute": our world only re-axed into LGM's y-up frame. Outputs are always in our world.
    pose_normalization: Literal["first_view", "absolute"] = "first_view"


class ReconstructorConfig(_Strict):
    """Views + cameras -> 3D Gaussians. ``kind`` picks the network (geco/models/reconstructors/), whose
    own settings sit in the section of that name; the fields here are what every kind shares: where
    the weights come from, the input views (size, the cameras the network is told), dtype, background."""

    kind: Literal["lgm"] = "lgm"
    pretrained: str = ""  # weights of that kind (LGM: model_fp16_fixrot.safetensors; local or s3://); "" = tiny random
    input_size: int = Field(256, ge=8)  # view side fed to the network (views are resized to it)
    fovy_deg: float = Field(49.1, gt=0, lt=180)  # camera FOV the reconstructor assumes (GECO fed LGM 47.1)
    radius: float = Field(1.5, gt=0)  # camera distance the reconstructor assumes
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # model dtype; loaded weights are cast to it
    # input views: the Zero123++ elevations the reconstructor is told (v1.2: 20/-10; GECO fed v1.1's 30/-20)
    zero123_elevations: tuple[Elevation, Elevation] = (20.0, -10.0)
    background: float = Field(1.0, ge=0, le=1)  # grey level of the input views' background and the default render background (LGM: white; GECO: 0.5)
    lambda_lpips: float = Field(1.0, ge=0)  # LPIPS weight in the pretraining loss (LGM: 1.0)
    lgm: LGMConfig = LGMConfig()  # kind "lgm"

    @model_validator(mode="after")
    def _input_fits_network(self) -> "ReconstructorConfig":
        if self.kind == "lgm":
            downsamples = len(self.lgm.down_channels) - 1
            if self.input_size % 2**downsamples:
                raise ValueError(
                    f"models.reconstructor.input_size={self.input_size} must be divisible by {2**downsamples} "
                    f"(the {downsamples} downsamples of models.reconstructor.lgm.down_channels); change either")
        return self


# Fields that moved: an old path gets "moved to <new path>" instead of "unknown field".
MOVED_FIELDS = {f"models.reconstructor.{f}": f"models.reconstructor.lgm.{f}" for f in LGMConfig.model_fields}


class LPIPSConfig(_Strict):
    """LPIPS perceptual distance; weights from a local path, a cache or a URL (never a stand-in)."""

    net: Literal["alex", "vgg"] = "vgg"
    backbone_weights: str = ""  # torchvision-format AlexNet/VGG16 state dict (.pth/.safetensors)
    linear_weights: str = ""  # LPIPS v0.1 linear layers (e.g. the lpips package's vgg.pth)


class ModelsConfig(_Strict):
    teacher: TeacherConfig = TeacherConfig()
    generator: GeneratorConfig = GeneratorConfig()
    reconstructor: ReconstructorConfig = ReconstructorConfig()
    lpips: LPIPSConfig = LPIPSConfig()


# --------------------------------------------------------------------------------------------
# Training (Ray Train). Every training stage embeds a TrainJobConfig: how many steps, the
# optimiser, checkpoints, evaluation, and the Ray Train resources; pipelines/training/
# runs any stage from it.
# --------------------------------------------------------------------------------------------
class TrainJobConfig(_Strict):
    """One Ray Train job: steps, optimiser, schedule, checkpoints, evaluation, resources."""

    steps: int = Field(10000, ge=0)  # optimiser steps in all; a re-run resumes and trains up to this
    batch_size: int = Field(4, ge=1)  # objects per worker per micro-batch
    grad_accumulation: int = Field(1, ge=1)  # micro-batches per optimiser step
    lr: float = Field(1e-4, gt=0)  # peak learning rate (AdamW)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"  # decay after the warmup
    lr_warmup_steps: int = Field(0, ge=0)  # linear warmup from lr/warmup to lr
    lr_min_ratio: float = Field(0.0, ge=0, le=1)  # the decay ends at lr * this
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    max_grad_norm: float = Field(1.0, ge=0)  # clip the global gradient norm (0 = no clipping)
    mixed_precision: Literal["no", "bf16"] = "bf16"  # bf16 autocast on GPU; CPU always runs float32
    gradient_checkpointing: bool = False  # trade compute for memory where the model supports it
    seed: int = 0  # model init, data shuffling and noise; each worker adds its rank
    shuffle_buffer: int = Field(64, ge=1)  # rows in each worker's local shuffle buffer (1 = stream order)
    prefetch_batches: int = Field(2, ge=0)  # steps of input decoded ahead on a background thread (0 = on the training thread)
    checkpoint_every: int = Field(500, ge=1)  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = Field(3, ge=1)  # Ray Train keeps the newest K checkpoints
    eval_every: int = Field(500, ge=0)  # steps between evaluations on held-out objects (0 = start and end only)
    eval_objects: int = Field(4, ge=1)  # held-out objects evaluated (and shown in the sample grids)
    log_every: int = Field(1, ge=1)  # steps between MLflow metric logs (losses, learning rates)
    num_workers: int = Field(1, ge=1)  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU (or gpus_per_worker) per worker; NCCL; bf16 autocast
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on small machines: Ray Data needs CPUs too
    gpus_per_worker: float = Field(1.0, ge=0)  # used when use_gpu
    torch_threads: int = Field(0, ge=0)  # torch.set_num_threads per worker (0 = torch's default; 1 for tiny models)
    # Before training, the job checks that the Ray cluster has the CPUs/GPUs its workers ask for and
    # fails at once when it does not (Ray would wait forever). True skips that check and lets Ray wait:
    # for an autoscaling cluster whose GPU nodes start on demand.
    wait_for_resources: bool = False
    max_failures: int = Field(3, ge=0)  # worker-group restarts Ray Train allows (each resumes from the last checkpoint)
    storage_path: str = "outputs/train"  # Ray Train runs and checkpoints: a local folder or s3://bucket/prefix
    run_name: str = ""  # Ray Train run name ("" = <name>-<stage>-<config hash>; the same name resumes)


class PretrainTeacherConfig(TrainJobConfig):
    """Teacher pretraining: v-prediction diffusion loss on the 6-view grid given the condition view.

    A teacher trained here starts from random weights, so its VAE is trained with it (MSE + KL)."""

    drop_cond_prob: float = Field(0.1, ge=0, le=1)  # condition dropout (classifier-free guidance)
    vae_loss_weight: float = Field(1.0, ge=0)  # weight of the VAE reconstruction loss (0 = keep the VAE as built)
    vae_kl_weight: float = Field(1e-3, ge=0)  # per-element KL weight: keeps latents near unit variance
    vae_scaling_factor: float = Field(1.0, gt=0)  # the new VAE's latent scale (SD's 0.18215 fits SD's VAE, not this one)
    # The new CLIP image encoder is random too: frozen, it gives nearly one embedding for every image
    # (cosine 0.97 between images) and the UNet barely learns to use its condition. True trains it with
    # the UNet (Zero123++ keeps its released CLIP frozen; this is for teachers made from scratch).
    train_image_encoder: bool = True
    eval_steps: int = Field(10, ge=1)  # DDIM steps of the evaluation samples
    eval_guidance_scale: float = Field(1.0, ge=1.0)  # CFG of the evaluation samples
    eval_timesteps: int = Field(8, ge=1)  # evenly spaced timesteps of the held-out diffusion loss


class PretrainReconstructorConfig(TrainJobConfig):
    """Reconstructor pretraining: ground-truth Zero123++ views in, rendering losses on other views."""

    # The default lives on the field (not on the instance below), so a partial YAML section
    # such as `pretrain.reconstructor.steps: 5` keeps it.
    lr: float = Field(4e-4, gt=0)  # peak learning rate (AdamW); LGM used 4e-4
    supervision_views: int = Field(4, ge=1)  # views rendered and supervised per object per step
    supervise_zero123_views: bool = True  # draw supervision views from the 6 input views too (else random views only)
    render_size: int = Field(0, ge=0)  # supervision resolution, every view resized to it (0 = the random views' size)


class PretrainConfig(_Strict):
    """The `pretrain` stage: trains whichever of teacher / reconstructor has no `pretrained` weights."""

    targets: list[Literal["teacher", "reconstructor"]] = ["teacher", "reconstructor"]  # considered for training
    output_uri: str = "outputs/pretrained"  # teacher/ (Zero123++ layout) and reconstructor/model.safetensors
    log_weights: bool = True  # also log the final weights as MLflow artifacts
    concurrent: bool = False  # run the teacher and reconstructor jobs at the same time (if the cluster fits both)
    teacher: PretrainTeacherConfig = PretrainTeacherConfig()
    reconstructor: PretrainReconstructorConfig = PretrainReconstructorConfig()


# TrainJobConfig fields that stage 1 replaces with one setting per network (Stage1TrainConfig rejects them)
_STAGE1_PER_NETWORK = {
    "lr": "stage1.lr_generator and stage1.lr_fake",
    "adam_betas": "stage1.betas_generator and stage1.betas_fake",
    "max_grad_norm": "stage1.max_grad_norm_generator and stage1.max_grad_norm_fake",
}


class Stage1TrainConfig(TrainJobConfig):
    """The stage-1 Ray Train job: TrainJobConfig with stage-1 defaults (a subclass, so that a partial
    `stage1.train` section in a file keeps them). Stage 1 trains two networks, each with its own
    learning rate, betas and clipping (`stage1.lr_generator`, `stage1.betas_fake`, ...): the job's
    single `lr`, `adam_betas` and `max_grad_norm` do not exist here (setting one is an error naming
    the stage-1 settings); the schedule applies to both optimisers."""

    steps: int = Field(5000, ge=0)  # the paper: 5,000 steps (1x L40, ~4 h)
    batch_size: int = Field(1, ge=1)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # the paper: constant Adam
    gradient_checkpointing: bool = True  # on the generator's and the fake score's UNets (real scale)
    # inherited, not used by stage 1: None, and left out of dumps (so a dumped config loads again)
    lr: None = Field(None, exclude=True)
    adam_betas: None = Field(None, exclude=True)
    max_grad_norm: None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_single_network_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, use in _STAGE1_PER_NETWORK.items():
                if data.get(key) is not None:
                    raise ValueError(f"stage1.train.{key} does not apply to stage 1 (two networks): set {use} instead")
        return data


class Stage1Config(_Strict):
    """The `stage1` stage: VSD distillation of the teacher into the one-step generator (PAPER.md,
    "Stage 1"). Teacher frozen; generator and fake score initialised from its UNet; alternating
    generator and fake-score updates with their own Adam(W) optimisers and LR schedules."""

    # Where the teacher and reconstructor weights come from is not configured here: they are the
    # stage's inputs (pipelines.stage.Stage1Inputs) - what the pretrain stage trained, or
    # models.<name>.pretrained, or `geco train stage1 --teacher/--reconstructor URI`.
    output_uri: str = "outputs/stage1"  # generator/ (diffusers UNet + generator.json) and bundle/ (GECO checkpoint)
    bundle_teacher_unet: bool = False  # also store the teacher UNet in the bundle (enables teacher sampling from it)
    log_weights: bool = True  # log the exported bundle as MLflow artifacts (weights/bundle)
    # the Ray Train job (steps, batch, accumulation, schedule, checkpoints, eval, workers/GPUs, bf16,
    # gradient checkpointing); learning rates, betas and clipping are per network, below
    train: Stage1TrainConfig = Stage1TrainConfig()
    lr_generator: float = Field(1e-6, gt=0)  # Adam on the generator's UNet (paper: 1e-6)
    lr_fake: float = Field(1e-6, gt=0)  # Adam on the fake score (paper: 1e-6 for a full copy; balancing the two matters)
    # generator Adam betas: (0.9, 0.999) as the paper writes; the authors' code uses (0.0, 0.99)
    betas_generator: tuple[float, float] = (0.9, 0.999)
    betas_fake: tuple[float, float] = (0.9, 0.999)  # the paper and the authors' code
    # gradient-norm clipping per network (0 = off). The method weights every timestep alike; clipping
    # the generator rescales each step by 1/|grad| (a weighting w(t) it excludes); the authors clip
    # neither network (they only zero NaN/inf in the VSD gradient, which this code always does too).
    max_grad_norm_generator: float = Field(0.0, ge=0)
    max_grad_norm_fake: float = Field(1.0, ge=0)
    # full: a full UNet copy (the paper and the authors' code). lora: an adapter sharing the teacher's
    # weights (much less memory) that learns far more slowly per step: it needs a much larger lr_fake
    # than a full copy to track the generator (check that eval/loss_fake falls; configs/local.yaml).
    fake_score: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(4, ge=1)  # LoRA rank on q/k/v/out of every attention (fake_score=lora)
    lora_alpha: float = Field(0.0, ge=0)  # LoRA alpha (0 = the rank: scale 1)
    teacher_cfg: float = Field(4.0, ge=1.0)  # classifier-free guidance of the teacher's score
    fake_cfg: float = Field(1.0, ge=1.0)  # guidance of the fake score (1 = conditional only)
    fake_drop_cond_prob: float = Field(0.0, ge=0, le=1)  # condition dropout in the fake-score loss (needed if fake_cfg > 1)
    t_min: float = Field(0.02, ge=0, le=1)  # timesteps t ~ U[t_min, t_max] x 1000, both losses
    t_max: float = Field(0.98, ge=0, le=1)
    fake_steps: int = Field(1, ge=1)  # fake-score updates per generator update
    # the fake score's diffusion loss: eps = MSE on the noise (its v output converted to eps; the
    # authors' code), v = MSE on v (= the eps loss weighted by 1/alpha_bar_t: more weight on high t)
    fake_loss: Literal["eps", "v"] = "eps"
    # optional DMD-style regression: LPIPS + MSE of G(cond, z) against teacher samples made from the
    # same saved noise z (per object, seeded by its id); 0 = off. LPIPS joins when its weights load.
    regression_weight: float = Field(0.0, ge=0)
    regression_mse_weight: float = Field(1.0, ge=0)
    regression_lpips_weight: float = Field(1.0, ge=0)
    regression_teacher_steps: int = Field(75, ge=1)  # deterministic DDIM steps of those teacher samples
    regression_cache_objects: int = Field(4096, ge=0)  # teacher sample latents kept in memory per worker
    eval_teacher_steps: int = Field(20, ge=1)  # DDIM steps of the teacher samples in the eval grids (CFG teacher_cfg)
    sample_every: int = Field(0, ge=0)  # steps between sample-grid images (0 = at every evaluation; always at the end)
    fsdp: bool = False  # shard the generator with FSDP over the workers (GPU, num_workers > 1); else DDP

    @model_validator(mode="after")
    def _t_range(self) -> "Stage1Config":
        if self.t_min > self.t_max:
            raise ValueError(f"stage1.t_min ({self.t_min}) must not exceed stage1.t_max ({self.t_max})")
        return self


# --------------------------------------------------------------------------------------------
# Model registry (the `register` stage): MLflow model versions, aliases, promotion rule
# --------------------------------------------------------------------------------------------
# GSO metrics where higher is better; every other gso/<view set>/<metric> is lower-is-better
HIGHER_IS_BETTER = ("psnr", "ssim", "viou", "fscore")


class RegistryConfig(_Strict):
    """The `register` stage: the final bundle becomes a version of registered model `model_name` with
    its GSO metrics, alias `candidate_alias`; `production_alias` moves to it only when no gated metric
    regresses beyond `tolerance` against the current production version (or when there is none)."""

    model_name: str = "geco"  # `geco generate --checkpoint models:/<model_name>@production`
    candidate_alias: str = "candidate"  # always points at the newest registered version
    production_alias: str = "production"  # moved only when the promotion rule allows it
    # if_no_regression: the rule above; always: move it regardless; never: only the candidate alias
    promote: Literal["if_no_regression", "always", "never"] = "if_no_regression"
    # relative tolerance: a gated metric regresses when it is worse than production's by more than
    # tolerance x |production's value| (higher-is-better: psnr, ssim, viou, fscore; the rest lower)
    tolerance: float = Field(0.02, ge=0)
    # the metric names (gso/<view set>/<name>) the rule compares; timings are left out (machines differ)
    gate_metrics: list[str] = ["psnr", "ssim", "lpips", "cd", "viou", "fscore"]

    @field_validator("model_name", "candidate_alias", "production_alias")
    @classmethod
    def _registry_name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/@: "):
            raise ValueError("must be non-empty with no '/', '@', ':' or spaces")
        return v


# --------------------------------------------------------------------------------------------
# Evaluation (the `evaluate` stage: pipelines/evaluate.py, the GSO protocol; geco/eval/)
# --------------------------------------------------------------------------------------------
EVAL_MODEL_NAMES = ("teacher", "teacher_1step", "stage1", "stage2")


class EvaluateConfig(_FiniteStrict):
    """The `evaluate` stage: ground truth rendered by the project's renderer at the protocol's views,
    every model under test run on the input view, PSNR/SSIM/LPIPS per view set, CD/vIoU/F-score from
    depth maps, seconds per object; a results folder, a report, an MLflow run (PAPER.md "Evaluation")."""

    # a Google Scanned Objects folder (<name>/meshes/model.obj; local or s3://); "" = a few procedural
    # objects written in the GSO layout under output_uri/gso-demo (the embedded demo; no download)
    gso_uri: str = ""
    objects: list[str] = Field(default_factory=list)  # folder names to evaluate; empty = every object of the folder
    demo_objects: int = Field(3, ge=1)  # how many procedural GSO-layout objects when gso_uri is ""
    output_uri: str = "outputs/evaluate"  # results/ (+ results/report/), gt/ (the ground-truth render cache)
    # models under test, name -> URI (local/s3:// GECO bundle, runs:/..., models:/name@alias; the teachers
    # also a Zero123++ folder or a pretrain output). Names: teacher (K steps), teacher_1step, stage1, stage2.
    # The DAG fills in what its stages produced; entries here take precedence.
    models: dict[str, str] = Field(default_factory=dict)
    teacher_steps: int = Field(75, ge=1)  # the multi-step teacher's sampling steps (GECO: 75)
    input_resolution: int = Field(512, ge=8)  # the input view (elevation 0, azimuth 0; paper: 512)
    resolution: int = Field(320, ge=8)  # the view sets' renders, ground truth and models alike
    orbit_views: int = Field(15, ge=1)  # evenly spaced azimuths at orbit_elevation (paper: 15 at 0 deg)
    orbit_elevation: Elevation = 0.0
    # geometry: depth maps at fixed cameras (geco/eval/geometry.py); SyncDreamer: 16 at 30 deg, 256 px.
    # Elevations alternate over the cameras; occupancy carving needs some below the object.
    geometry_views: int = Field(16, ge=1)
    geometry_elevations: list[Elevation] = Field(default_factory=lambda: [30.0, -30.0], min_length=1)
    geometry_resolution: int = Field(256, ge=8)
    voxel_size: float = Field(0.01, gt=0)  # point-cloud voxel downsampling (SyncDreamer: 0.01)
    iou_grid: int = Field(64, ge=4)  # occupancy grid cells per side over [-iou_extent, iou_extent]^3
    iou_extent: float = Field(1.0, gt=0)
    # F-score thresholds in units of the object's largest side; "fscore" is the first (SF3D/SPAR3D: 0.1)
    fscore_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.05], min_length=1)
    # LPIPS (AlexNet, as papers report it): torchvision's alexnet-owt-7be5be79.pth and the LPIPS v0.1 alex
    # linear layers (local, s3://, URL); "" = the torch hub cache / an installed lpips package. None load:
    # LPIPS is reported "unavailable", never a stand-in
    lpips_backbone_weights: str = ""
    lpips_linear_weights: str = ""
    seed: int = 0  # generator / teacher noise per object: seed + index of the object
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where models under test run
    num_gpus: float = Field(0.0, ge=0)  # GPUs of the Ray actor that runs the models under test
    num_cpus: float = Field(1.0, gt=0)  # CPUs of that actor (fractional on small machines)
    turntable_frames: int = Field(24, ge=0)  # per object and model (0 = none)
    turntable_size: int = Field(128, ge=8)
    plot: bool = True  # plots/metrics.png

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(v) - set(EVAL_MODEL_NAMES))
        if bad:
            raise ValueError(f"unknown model name(s) {', '.join(bad)}; use {', '.join(EVAL_MODEL_NAMES)}")
        return v


class PseudoGTConfig(_FiniteStrict):
    """`geco pseudo-gt` (the DAG's pseudo_gt stage): the teacher's 75-step deterministic DDIM from
    saved noise -> 6 views -> the reconstructor -> Gaussians rendered at ``num_views`` views (the 6
    Zero123++ poses + random ones), written as shards beside the render shards (PAPER.md "Stage 2")."""

    output_uri: str = "outputs/pseudo_gt"  # shards + manifest + failures, as render's (local dir or s3://)
    steps: int = Field(75, ge=1)  # deterministic DDIM steps of the teacher (GECO v1: 75)
    guidance_scale: float | None = Field(None, ge=1.0)  # CFG of those samples; None = models.teacher.guidance_scale
    batch_size: int = Field(4, ge=1)  # objects per teacher / reconstructor batch in one actor
    num_views: int = Field(50, ge=7)  # rendered views: the 6 Zero123++ poses + num_views - 6 random (GECO v1: 50)
    resolution: int = Field(256, ge=8)  # square side of every rendered view (stage 2's LPIPS runs at 256 px)
    random_elevation_range: tuple[Elevation, Elevation] = (-90.0, 90.0)  # degrees, uniform in [lo, hi) (GECO v1)
    random_azimuth_range: tuple[float, float] = (0.0, 360.0)  # degrees, uniform in [lo, hi)
    random_radius: float = Field(1.5, gt=0)  # camera distance of the random views (GECO v1: 1.5)
    random_fov_deg: float = Field(49.1, gt=0, lt=180)  # FOV of the random views
    seed: int = 0  # initial noise and random views are seeded by hash(object key, seed)
    # The reconstructor reads the teacher's tiles resized to models.reconstructor.input_size: refuse a pair
    # that would upscale the tiles by more than this (a mismatched teacher/reconstructor; checked at start).
    max_reconstructor_upscale: float = Field(2.0, ge=1.0)
    num_actors: int = Field(1, ge=1)  # Ray Data actors, each holding the teacher and the reconstructor once
    cpus_per_actor: float = Field(1.0, gt=0)  # fractional on small machines (Ray Data needs CPUs too)
    gpus_per_actor: float = Field(0.0, ge=0)  # 1 on a GPU cluster
    torch_threads: int = Field(0, ge=0)  # torch.set_num_threads per actor (0 = torch's default)

    @model_validator(mode="after")
    def _ranges(self) -> "PseudoGTConfig":
        (elo, ehi), (alo, ahi) = self.random_elevation_range, self.random_azimuth_range
        if elo > ehi or alo > ahi:
            raise ValueError("pseudo_gt.random_elevation_range / random_azimuth_range must be [low, high]")
        return self

    def settings_hash(self, teacher_guidance: float) -> str:
        """What changes a pseudo-GT sample besides its source, teacher and reconstructor (not how
        the work is spread: actors, CPUs, GPUs, threads, batch size, output)."""
        d = self.model_dump(mode="json")
        for k in ("output_uri", "batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "torch_threads",
                  "max_reconstructor_upscale"):
            d.pop(k)
        d["guidance_scale"] = teacher_guidance if self.guidance_scale is None else self.guidance_scale
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Stage2TrainConfig(TrainJobConfig):
    """The stage-2 Ray Train job: TrainJobConfig with the paper's stage-2 values as defaults (a
    subclass, so that a partial `stage2.train` section in a file keeps them). PAPER.md "Stage 2":
    AdamW lr 1e-6, weight decay 0.05, betas 0.9/0.95 (v1 code), batch 4 on 4 GPUs, 5 epochs."""

    # 5 epochs of the ~46K LVIS objects (PAPER.md "Data") at 4 objects per step: 46,000 x 5 / 4
    steps: int = Field(57500, ge=0)
    # PAPER.md: batch 4 on 4x L40 -> 1 object per GPU worker (num_workers 4: configs/paper.yaml)
    batch_size: int = Field(1, ge=1)
    lr: float = Field(1e-6, gt=0)  # PAPER.md: lr 1e-6 (AdamW)
    weight_decay: float = Field(0.05, ge=0)  # GECO v1 code: AdamW weight decay 0.05
    adam_betas: tuple[float, float] = (0.9, 0.95)  # GECO v1 code: betas (0.9, 0.95)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # not in PAPER.md: a constant lr
    gradient_checkpointing: bool = True  # on the generator's UNet (real scale)


class Stage2Config(_Strict):
    """The `stage2` stage: 3D-consistency fine-tuning of the stage-1 generator through the frozen
    reconstructor and the rasterizer against pseudo ground truth (PAPER.md "Stage 2")."""

    # Where the pseudo-GT shards and the stage-1 bundle come from is not configured here: they are the
    # stage's inputs (pipelines.stage.Stage2Inputs) - what pseudo_gt and stage1 wrote, or
    # `geco train stage2 --pseudo-gt URI --bundle URI`.
    output_uri: str = "outputs/stage2"  # generator/ and bundle/ (the GECO checkpoint `geco generate` loads)
    log_weights: bool = True  # log the exported bundle as MLflow artifacts (weights/bundle)
    train: Stage2TrainConfig = Stage2TrainConfig()  # the Ray Train job (AdamW, schedule, checkpoints, workers)
    views_per_step: int = Field(4, ge=1)  # PAPER.md: 4 random views of the sample's 50 per object (v1 code: 12)
    lambda_lpips: float = Field(1.0, ge=0)  # LPIPS(VGG) weight (LGM's 1.0); the term is off, with a warning, without weights
    render_size: int = Field(0, ge=0)  # supervision side in px, views resized to it (0: the sample's smallest view)
    # True: the generator starts from the noise the teacher sampled the pseudo-GT from (noise.npy; a
    # fixed noise per object, seeded by its key, where a sample has none); False: fresh noise every step
    use_saved_noise: bool = True


class RetrainConfig(_Strict):
    """`geco retrain` (pipelines/retrain.py): render what the source added or changed since the dataset
    version the production model was trained on, continue training from that model, evaluate, and
    move the production alias only under registry's promotion rule."""

    # every retraining run writes its training outputs under <output_uri>/<run key>/ (stage1/, stage2/,
    # train/, evaluate/): the key names the production version it starts from and the source it sees,
    # so a re-run of a failed retraining resumes and two retrainings never share checkpoints
    output_uri: str = "outputs/retrain"
    # the DAG stages a retraining runs, in DAG order (pretrain is not one: the teacher stays the teacher)
    stages: list[Literal["render", "stage1", "pseudo_gt", "stage2", "evaluate", "register"]] = [
        "render", "stage1", "pseudo_gt", "stage2", "evaluate", "register"]
    # the lease <dataset.uri>/leases/retrain.json that keeps two overlapping runs from both writing:
    # renewed every lease_ttl_s / 3 while the run lives; a holder that died frees it after lease_ttl_s
    lease_ttl_s: float = Field(3600.0, ge=10)

    @field_validator("stages")
    @classmethod
    def _stages_ok(cls, v: list[str]) -> list[str]:
        if "stage1" not in v:
            raise ValueError("must include stage1: a retraining continues training the production generator")
        return v


class GecoConfig(_Strict):
    """The whole DAG in one flat config; each stage reads the sections it needs."""

    name: str = "geco-local"  # names the MLflow parent run and Ray Train runs
    source: SourceConfig = SourceConfig()
    render: RenderConfig = RenderConfig()
    limits: JobLimitsConfig = JobLimitsConfig()
    dataset: DatasetConfig = DatasetConfig()
    cache: CacheConfig = CacheConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    models: ModelsConfig = ModelsConfig()
    pretrain: PretrainConfig = PretrainConfig()  # train teacher/reconstructor where no weights are given
    stage1: Stage1Config = Stage1Config()  # VSD distillation of the one-step generator
    registry: RegistryConfig = RegistryConfig()  # the `register` stage: model versions + aliases
    evaluate: EvaluateConfig = EvaluateConfig()  # the GSO evaluation (PSNR/SSIM/LPIPS, CD/vIoU/F-score, seconds)
    pseudo_gt: PseudoGTConfig = PseudoGTConfig()  # teacher -> reconstructor -> rendered views, for stage 2
    stage2: Stage2Config = Stage2Config()  # 3D-consistency fine-tuning of the generator
    retrain: RetrainConfig = RetrainConfig()  # `geco retrain`: scheduled retraining with a promotion guard

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("must be non-empty with no slashes or spaces")
        return v

    @model_validator(mode="after")
    def _models_fit_renders(self) -> "GecoConfig":
        """Model sizes and cameras against the views rendered for them (each problem one line)."""
        problems = []
        z, teacher, recon = self.render.zero123, self.models.teacher, self.models.reconstructor
        # The teacher learns (pretrain) and is distilled (stage 1) against the rendered Zero123++ views
        # resized to its tile: renders smaller than a tile would be upsampled into blurry targets.
        if z.resolution < teacher.tile_size:
            problems.append(
                f"render.zero123.resolution={z.resolution} is below models.teacher.tile_size={teacher.tile_size}: "
                f"the teacher's targets would be upsampled renders; render at >= {teacher.tile_size} px or lower the tile size")
        # The reconstructor is told its input views were taken at zero123_elevations; the views it gets
        # are the renders (pretrain) and the teacher's (trained on those renders). Only a pretrained
        # teacher and reconstructor may disagree with the renders (GECO told LGM 30/-20 for v1.2's 20/-10).
        if tuple(z.elevations) != tuple(recon.zero123_elevations) and not (teacher.pretrained and recon.pretrained):
            problems.append(
                f"render.zero123.elevations={list(z.elevations)} differ from models.reconstructor.zero123_elevations="
                f"{list(recon.zero123_elevations)}: the reconstructor would be told the wrong cameras; set both alike")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _DuplicateKey(ValueError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line}); keep only one")


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently, so the first setting would be ignored without a word). Merge keys (``<<``) may
    still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the SafeLoader says so below
                    pass
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: ``line 3, column 5: mapping values are not allowed here``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/flows: 256, 0.5, true, [1, 2], s3://b/p."""
    return _load_yaml(text) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (creating sections as needed)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. render.blender.samples=32")
        key, value = item.split("=", 1)
        try:
            parsed = _parse_scalar(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "quote it or fix it") from None
        except _DuplicateKey as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = parsed
    return data


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the section at ``loc[:-1]`` under ``model`` (None: not a config section)."""
    node: Any = model
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return None
        node = field.annotation
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown_field(model: type[BaseModel] | None, loc: tuple) -> str:
    """``unknown field; did you mean 'steps'?`` or ``unknown field; stage1.train has: ...``
    (or ``moved to ...`` for a field listed in MOVED_FIELDS)."""
    path = ".".join(str(p) for p in loc)  # relative to `model`: a ModelsConfig's loc has no "models."
    moved = next((new for old, new in MOVED_FIELDS.items() if old == path or old.endswith("." + path)), None)
    if moved and len(loc) > 1:
        return f"moved to {moved}"
    fields = _section_fields(model, loc) if model is not None else None
    if not fields:
        return "unknown field"
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    where = ".".join(str(p) for p in loc[:-1]) or "the top level"
    return f"unknown field; {where} has: {', '.join(fields)}"


def _format_error(source: str, err: ValidationError, model: type[BaseModel] | None = None) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        msg = _unknown_field(model, tuple(e["loc"])) if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")  # our validators' messages say it all
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: dict, source: str = "<config>"):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, model)) from None


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file, not yet validated. Every way a file can be unusable (missing,
    unreadable, not UTF-8, not YAML, a key given twice, not a mapping) is one-line ConfigError
    naming the file (and the line where there is one)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found (see configs/ for examples)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); save the "
                          "file as UTF-8") from None
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = GecoConfig):
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        data = read_config_file(path)
        source = str(Path(path))
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    return validate(model, data, source)
