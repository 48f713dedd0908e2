"""DP fine-tuning of the CIFAR-10-pretrained ResNet-20 on Fashion-MNIST at (epsilon 3, 1e-5).

    python -m dpft --config configs/fmnist_resnet20.py --workdir runs/fmnist_resnet20
    python -m dpft --config configs/fmnist_resnet20.py:smoke --workdir /tmp/r20_smoke    # seconds
    python -m dpft --config configs/fmnist_resnet20.py:last_block --workdir runs/r20_lb  # slower
    python -m dpft --config configs/fmnist_resnet20.py:full --workdir runs/r20_full      # slowest

Expected: default (head) 76.0% test accuracy at epsilon 3.00 (seed 0, 293 steps; e2e_runs.md).

The CIFAR-10 features transfer weakly: configs/fmnist_best.py is the recipe that leads. The
default (`finetune.mode='head'`) tunes a zero-initialised head on the frozen pretrained backbone
(frozen BatchNorm statistics): the backbone's 64-d features of the 70k images are computed once,
cached in WORKDIR/features, and the DP-SGD steps train the head on them, on the whole training
set. `:lp_ft` spends half the steps (of one budget) on that head, then tunes the last block +
head; `:last_block` and `:full` tune deeper layers from the start, which is slow on XLA:CPU
(per-example convolution gradients), so those variants fit a CPU budget only on a subset. They
use learning rate 2.0 for the last block (`:last_block`; `:lp_ft` after its head phase at 16)
and 0.5 for every layer (`:full`); at the head's 16 they diverged. On a subset:

    python -m dpft --config configs/fmnist_resnet20.py:full --workdir runs/r20_full_6k \
        --config.data.train_subset=6000 --config.train.batch_size=1024 --config.train.epochs=5 \
        --config.train.microbatch_size=256

gave test accuracy 70.78% at epsilon 2.999 (30 steps; with rate 2.0 the loss blew up after 5
steps and the run ended at 10%). Poisson batches of this size are padded to 1234 rows, 5
microbatches of 256, which the default `train.microbatch_unroll=0` unrolls on CPU (scheduled for
memory: 1.7 GB of compiled step instead of 4.2 GB; wall times in experiments/results/e2e_runs.md
and docs/scale.md). Smoke runs (6 steps of 64 on 2000 examples, rate 0.5) gave 29.8%
(`:full,smoke`), 16.8% (`:last_block,smoke`) and 34.4% (`:lp_ft,smoke`) at epsilon 2.995. The
result of the default run (test accuracy, epsilon, wall time) is recorded in
experiments/results/e2e_runs.md.

Tuning: the head's learning rate 16 and the last block's 2.0 were chosen on a validation split
of the private training set (experiments/results/lp_ft.md); the rate 0.5 of `:full` was picked
from two runs (0.5, and 2.0 which diverged), looking at their test accuracy: not a tuned figure.
None of this choosing is counted in the reported epsilon.
"""

from dpft.config import base_config, make_smoke, parse_arg


def get_config(arg: str = ""):
    c = base_config()
    c.name = "fmnist_resnet20"
    c.data.name = "fashion_mnist"
    c.model.name = "resnet20"
    c.model.norm = "frozen_bn"
    c.model.pretrained = "resnet20"
    c.finetune.mode = "head"  # features of the frozen backbone are cached in the workdir
    c.finetune.head_init = "zero"
    c.dp.epsilon = 3.0
    c.dp.delta = 1e-5
    c.dp.clip_norm = 1.0
    # Tuned on a validation split (10% of train, runs/sweep): expected batch 4096, 20 epochs,
    # lr 16 gave 76.5% validation accuracy (lr 1 / 4 / 32: 68.4 / 73.9 / 76.3%).
    c.train.batch_size = 4096
    c.train.epochs = 20.0
    c.train.microbatch_size = 0
    c.train.optimizer = "sgd"
    c.train.momentum = 0.9
    c.train.learning_rate = 16.0
    c.train.schedule = "cosine"
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.eval_batch_size = 500
    a = parse_arg(
        arg,
        config="configs/fmnist_resnet20.py",
        choices={"mode": ("head", "last_block", "lp_ft", "full")},
        flags=("smoke",),
    )
    if a.smoke:
        make_smoke(c)
    if a.mode == "full":
        c.finetune.mode = "full"
    elif a.mode == "last_block":
        c.finetune.mode = "partial"
        c.finetune.trainable = (r"layer3_2/.*", r"linear/.*")
    elif a.mode == "lp_ft":
        c.finetune.mode = "lp_ft"
        c.finetune.trainable = (r"layer3_2/.*", r"linear/.*")
        c.finetune.lp_learning_rate = c.train.learning_rate  # the head's rate, as above
    if c.finetune.mode in ("full", "partial", "lp_ft"):
        # Tuning convolutions: the head's rate of 16 diverges (loss 3e8 after two steps). The
        # last block: 2.0, the FT rate chosen on the validation split by experiments/lp_ft
        # (grid 0.5, 2; SGD with momentum 0.9, cosine). Every layer: 0.5 (2.0 diverged after 5
        # steps of 1024 on a 6000-example subset, see the docstring). Smoke runs: 0.5.
        deep = c.finetune.mode == "full" or a.smoke
        c.train.learning_rate = 0.5 if deep else 2.0
    return c
