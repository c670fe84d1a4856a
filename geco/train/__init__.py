"""Training building blocks shared by every training stage (pure torch; Ray lives in ``pipelines/``).

* :mod:`geco.train.checkpoint` - resumable checkpoints: safetensors + JSON, never pickle.
* :mod:`geco.train.loop` - the per-step pattern (gradient accumulation, bf16 autocast on GPU,
  gradient clipping, warmup + cosine LR) and :class:`~geco.train.loop.TrainTask`, the interface a
  stage implements so that ``pipelines/training/`` can run it under Ray Train.
* :mod:`geco.train.stream` - a worker's rows: a seeded, resumable row stream and a prefetcher.
* :mod:`geco.train.pretrain` - the pretraining tasks (teacher diffusion, reconstructor rendering).
* :mod:`geco.train.stage1` - stage 1, VSD distillation of the teacher into the one-step generator.
"""
