"""DP-SGD on ImageNet (64x64) with a GroupNorm ResNet-18, sized for a TPU v4-32 pod slice.

A v4-32 slice has 16 TPU v4 chips on 4 hosts (4 chips per host; v4 is "megacore", so JAX sees
16 devices). Every host runs the same command; `jax.distributed.initialize()` finds the others
(`config.parallel.multihost='auto'` on a multi-host TPU VM), the mesh spans the 16 devices, each
host gathers the rows of its own 4 chips from the common Poisson batch, the noise is drawn once
per logical batch, and only host 0 writes metrics and summaries (checkpoints: all hosts, orbax).
See docs/pods.md::

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \\
      "cd dpft && python -m dpft --config configs/imagenet_pod.py \\
         --workdir gs://$BUCKET/runs/imagenet_pod --config.data.tfds_data_dir=gs://$BUCKET/tfds"

    python -m dpft --config configs/imagenet_pod.py:smoke --workdir /tmp/pod_smoke   # 2 steps

Data: TFDS ``imagenet_resized/64x64`` (ImageNet 2012, 1,281,167 training and 50,000 validation
images, box-resized to 64x64 by TFDS from the manually downloaded imagenet2012 archives; prepare
it once into the bucket with ``tfds build imagenet_resized/64x64 --manual_dir=...``), held in
host memory: 15.7 GB of uint8 images per host (a v4 host has ~400 GB). Full-resolution
``imagenet2012`` is streamed instead (``config.data.pipeline='grain'``, docs/data.md), as
``configs/imagenet_vit.py`` does.

Model: `dpft.models.ImageNetResNet` ResNet-18 (torchvision layout, 11.7M parameters, GroupNorm
with 32 groups so per-example gradients are well defined), trained from a fresh initialisation.
DP-SGD with momentum,
expected batch 16,384 (q = 0.0128), 20 epochs (1,564 steps), (epsilon 8, delta 5e-7: dpft
refuses delta >= 1/N = 7.8e-7), flat
clipping at 1, microbatches of 64 per device (16,384 / 16 devices = 1,024 rows per device).
Per-example norms: the default ``dp.norms='ghost'``, the faster choice on CPU (``make bench``);
which of ghost and ``vmap`` is faster on TPU has not been measured (both give the same sums).

``:finetune`` fine-tunes pretrained weights instead, as Kurakin et al. 2022 fine-tune a
Places365-pretrained ResNet on ImageNet: ResNet-18 in torchvision's layout with frozen BatchNorm
statistics (`dpft.models.pretrained`), every parameter trained, a zero-initialised head, 10
epochs at learning rate 1 (untuned). dpft ships no such weights: write a torchvision-layout
state dict as safetensors (docs/pods.md), copy it to every host and pass
``--config.model.pretrained_path=FILE``; without it the run stops with a one-line error.

Tuning: none (the hyperparameters are untuned); a search on private data would not be counted
in the reported epsilon.

Only `:smoke` was run (on CPU), so no accuracy or wall time is claimed; this smaller model on
64x64 images should land clearly below the published anchor. Report what a run gives in
experiments/results/e2e_runs.md. ``:smoke`` runs two steps on 32 random 64x64 images from
``tfds.testing.mock_data`` on CPU (tests/test_imagenet_pod.py): data, sampling, accounting,
checkpoints and outputs of this config end to end, with the small `SampleConvNet` standing in
for the ResNet-18 (whose per-example gradients are slow to compile and run on XLA:CPU; its
shapes are tested separately).

Expected: not run here; published anchor 32.4% top-1 at epsilon 8 (De et al. 2022, NF-ResNet-50).
"""

from dpft.config import base_config, parse_arg


def get_config(arg: str = ""):
    c = base_config()
    c.name = "imagenet_pod"
    c.data.name = "imagenet_resized/64x64"
    c.data.eval_split = "validation"
    c.data.preprocessing = "imagenet"
    c.model.name = "resnet18"
    c.model.norm = "group_norm"
    c.model.dtype = "bfloat16"  # activations; params, clipped sums and noise stay fp32
    c.dp.epsilon = 8.0
    c.dp.delta = 5e-7  # < 1/N = 7.8e-7
    c.dp.clip_norm = 1.0
    c.train.batch_size = 16384
    c.train.epochs = 20.0
    c.train.microbatch_size = 64  # per device, inside each device's 1,024 rows
    c.train.optimizer = "sgd"
    c.train.momentum = 0.9
    c.train.learning_rate = 4.0
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.eval_batch_size = 1000
    c.parallel.data = 0  # every device of every host
    a = parse_arg(arg, config="configs/imagenet_pod.py", flags=("smoke", "finetune"))
    if a.smoke:  # the pipeline end to end; a small CNN stands in for the ResNet
        c.model.name = "sample_convnet"
        c.model.norm = ""
        c.model.dtype = "float32"
        c.parallel.data = 1  # one CPU device
        c.data.train_subset = 32  # tests: all of tfds.testing.mock_data's 32 examples
        c.data.eval_subset = 32
        c.train.batch_size = 8
        c.train.max_batch_size = 32  # no cap on 32 examples: quick to account
        c.train.microbatch_size = 16
        c.train.steps = 2
        c.train.warmup_steps = 0
        c.train.log_every = 2
        c.dp.noise_multiplier = 1.0  # calibrating on a 32-example set is slow
        c.train.eval_every = 2
        c.train.checkpoint_every = 2
        c.dp.delta = 1e-3
        c.eval_batch_size = 32
    if a.finetune:  # pretrained torchvision-layout weights from pretrained_path
        c.model.norm = "frozen_bn"
        c.model.pretrained = c.model.name
        c.finetune.mode = "full"
        c.finetune.head_init = "zero"  # a fresh head for ImageNet's 1,000 classes
        c.train.epochs = 10.0
        c.train.learning_rate = 1.0
    if c.model.pretrained and c.model.name == "sample_convnet":
        raise ValueError(
            "configs/imagenet_pod.py: config arguments smoke and finetune do not combine "
            "(no CNN weights)"
        )
    return c
