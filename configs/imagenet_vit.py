"""DP transfer learning of a pretrained ViT-B/16 on ImageNet (Mehta et al. 2022 and 2023).

Three variants (the argument; each combinable with ``smoke``, e.g. ``:lamb,smoke``):

* ``lamb`` (default): huge-batch DP-LAMB fine-tuning of every parameter, as in Mehta et al.
  2022 ("Large scale transfer learning for differentially private image classification"):
  expected logical batch 2^18 = 262,144 (Poisson), gathered in host chunks of 4,096 rows
  (``train.host_chunk_size``) of microbatches of 32 (``train.microbatch_size``); a
  zero-initialised head; 10 epochs (49 steps).
* ``last_layer``: one full-batch DP-GD step on the last layer from a zero head, on the frozen
  backbone's features (Mehta et al. 2022's single-step result): `dpft.linear` method
  ``single_step``.
* ``dp_fc``: DP-GD on the features preconditioned by a noisy feature covariance (DP-FC, Mehta et
  al. 2023, "Differentially private image classification from features"): method ``dp_fc``.

The feature variants stream the training and validation images once through the evaluation
transform and the frozen backbone into sharded, checksummed feature files (per host, resumable:
`dpft.train.features.feature_shards`, under WORKDIR/features or ``finetune.cache_dir``), then fit
the head from the shards.

Data: TFDS ``imagenet2012`` (1,281,167 training, 50,000 validation images), prepared once with
``tfds build imagenet2012 --manual_dir=...``, streamed by grain (``data.pipeline='grain'``):
random-resized crop + flip to 224 px for training, resize + centre crop for evaluation,
normalised to [-1, 1] (``data.preprocessing='standard'``: mean = std = 0.5, what big_vision /
AugReg weights expect; use ``'imagenet'`` for timm weights trained in PyTorch).

Weights: a ViT-B/16 checkpoint in big_vision / AugReg ``.npz`` form (or timm / Hugging Face
safetensors), given as ``--config.model.pretrained_path=FILE``; none ships with dpft. The
google-research/vision_transformer README lists the public files, e.g. the ImageNet-21k
``ViT-B_16.npz`` or an AugReg ``B_16-i21k-*.npz`` in the ``gs://vit_models`` bucket. Without
the file the run stops with one line naming ``config.model.pretrained_path``. The position
embeddings are interpolated to 224 px if the checkpoint has another size. Launch::

    python -m dpft --config configs/imagenet_vit.py:lamb --workdir runs/imagenet_vit_lamb \\
      --config.model.pretrained_path=ViT-B_16.npz --config.data.tfds_data_dir=TFDS_DIR
    python -m dpft --config configs/imagenet_vit.py:last_layer --workdir runs/imagenet_vit_ll \\
      --config.model.pretrained_path=ViT-B_16.npz --config.data.tfds_data_dir=TFDS_DIR
    python -m dpft --config configs/imagenet_vit.py:dp_fc --workdir runs/imagenet_vit_dpfc \\
      --config.model.pretrained_path=ViT-B_16.npz --config.data.tfds_data_dir=TFDS_DIR

Privacy: (epsilon 8, delta 5e-7). Mehta et al. report delta = 1e-6, which is above 1/N =
7.8e-7 for ImageNet's N training images; dpft refuses delta >= 1/N, so delta is 5e-7 here.

Published figure: Mehta et al. 2022 report 81.7% top-1 on ImageNet over a range of epsilon in
[4, 10] at delta = 1e-6 with the single full-batch last-layer step from a near-zero head, on
features of far larger models pretrained on far larger (non-public) data than ViT-B/16 on
ImageNet-21k, and up to 20 points (absolute) gained by DP-LAMB over DP-SGD in fine-tuning; see
the papers' tables for the per-model and per-epsilon figures (Mehta et al. 2023 for DP-FC).

What has been run here: only the ``smoke`` variants, on CPU (no accelerator was available;
tests/test_imagenet_vit.py). No ImageNet accuracy or wall time is claimed for the full variants;
their hyperparameters (learning rates, steps, clip norms, feature clip) are untuned.
``smoke``: ``tfds.testing.mock_data`` images (random sizes, 1000 classes) at 32 px, a tiny ViT
checkpoint (2 blocks of width 32, 8-pixel patches; the test writes one with
tests/vit_checkpoints.py and passes its path), two steps (``lamb``: host chunks of 8 rows in
microbatches of 4; RDP accounting, faster than PLD at this size) or one fit (``last_layer``,
``dp_fc``), no grain worker processes (the mock lives in the test's process). Each smoke run
writes summary.json with a finite epsilon <= 8 and a test accuracy near chance (1/1000 on
random images).

Expected: not run here; published anchor 81.7% top-1 (Mehta et al. 2022, larger models and data).
"""

import ml_collections

from dpft.config import base_config, parse_arg

VARIANTS = ("lamb", "last_layer", "dp_fc")
#: variant -> config.linear overrides (feature methods; untuned for ImageNet).
LINEAR = {
    "last_layer": dict(method="single_step", optimizer="sgd", learning_rate=1.0),
    "dp_fc": dict(
        method="dp_fc", steps=30, learning_rate=2.0, feature_clip=3.0, cov_fraction=0.3, reg=0.01
    ),
}


def _linear(overrides: dict) -> ml_collections.ConfigDict:
    lin = ml_collections.ConfigDict()
    lin.method = "single_step"
    lin.steps = 1
    lin.learning_rate = 1.0
    lin.optimizer = "sgd"
    lin.weight_decay = 0.0
    lin.feature_clip = 2.0
    lin.reg = 1.0
    lin.targets = "onehot"
    lin.budget_split = 0.5
    lin.damping = 1.0
    lin.hessian = "bohning"
    lin.hessian_share = 0.5
    lin.cov_fraction = 0.3
    lin.update(overrides)
    return lin


def get_config(arg: str = ""):
    a = parse_arg(
        arg, config="configs/imagenet_vit.py", choices={"variant": VARIANTS}, flags=("smoke",)
    )
    variant, smoke = a.variant, a.smoke

    c = base_config()
    c.name = f"imagenet_vit_{variant}"
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.pipeline = "grain"
    c.data.image_size = 224
    c.data.preprocessing = "standard"  # big_vision / AugReg: (x / 255 - 0.5) / 0.5
    c.model.name = "vit_b16"
    c.model.pretrained = "vit"
    c.model.pretrained_path = ""  # the checkpoint file: required (see the docstring)
    c.finetune.head_init = "zero"
    c.dp.epsilon = 8.0
    c.dp.delta = 5e-7  # < 1/N = 7.8e-7 (Mehta et al.: 1e-6)
    c.dp.clip_norm = 1.0
    c.eval_batch_size = 500
    if variant == "lamb":
        c.finetune.mode = "full"
        c.train.optimizer = "lamb"
        c.train.batch_size = 2**18
        c.train.host_chunk_size = 4096
        c.train.microbatch_size = 32
        c.train.epochs = 10.0
        c.train.learning_rate = 0.01
        c.train.schedule = "cosine"
        c.train.warmup_steps = 5
        c.train.log_every = 1
        c.train.eval_every = 10
        c.train.checkpoint_every = 1  # a step of 2^18 examples is worth keeping
    else:
        c.finetune.mode = "head"
        c.linear = _linear(LINEAR[variant])
        c.dp.clip_norm = 1.0
    if smoke:
        c.model.name = "vit"  # whatever ViT the checkpoint holds (the test's is tiny)
        c.data.image_size = 32
        c.data.num_workers = 0  # tfds.testing.mock_data patches this process only
        c.dp.delta = 1e-3
        c.eval_batch_size = 16
        c.tensorboard = False
        if variant == "lamb":
            c.dp.accountant = "rdp"  # fast, where PLD on these tiny q, N is slow
            c.train.batch_size = 8
            c.train.host_chunk_size = 8
            c.train.microbatch_size = 4
            c.train.epochs = 0.0
            c.train.steps = 2
            c.train.warmup_steps = 0
            c.train.eval_every = 2
            c.train.checkpoint_every = 2
        elif variant == "dp_fc":
            c.linear.steps = 3
    return c
