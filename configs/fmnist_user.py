"""User-level DP on Fashion-MNIST: a DP-SGD linear head on ScatterNet features, with each of
6,000 synthetic users (10 training images each) protected as a whole, at epsilon 3 (or 1).

    python -m dpft --config configs/fmnist_user.py --workdir runs/user3
    python -m dpft --config configs/fmnist_user.py:1 --workdir runs/user1
    python -m dpft --config configs/fmnist_user.py:smoke --workdir /tmp/u_smoke  # seconds

The argument is a comma-separated list: ``3`` (default) or ``1`` (epsilon) and ``smoke`` (2000
images as 200 users of 10, 6 steps).

Recipe: ``config.dp.unit='user'`` (docs/user_level.md). The 60,000 training images are dealt to
6,000 public synthetic users of 10 (`dpft.privacy.users.synthetic_user_ids`, seeded by
``config.seed``); users are Poisson-sampled at rate 1024 / 6000 per step (``train.batch_size``
counts users), each sampled user brings its 10 images (``dp.examples_per_user``), whose mean
gradient is clipped to 0.1 as one unit; epsilon is at the user level (add/remove one user with
all its images) for 40 passes over the users. The features and the head are those of
``configs/fmnist_best.py:run`` (ScatterNet, J=2, L=8, per-example GroupNorm, cached once; a
zero-initialised Dense 3969 -> 10, SGD momentum 0.9, learning rate 16), not tuned for this
setting.

``:smoke`` (200 users of 10, 6 steps, 500 test images) reaches 0.616 at user-level epsilon
3.00.

Expected: 85.9% test accuracy at user-level epsilon 3.00, delta 1e-5, 235 steps (seed 0).
"""

from dpft.config import base_config, make_smoke, parse_arg

EPSILONS = {"3": 3.0, "1": 1.0}


def get_config(arg: str = "3"):
    a = parse_arg(
        arg,
        config="configs/fmnist_user.py",
        choices={"epsilon": tuple(EPSILONS)},
        flags=("smoke",),
    )
    epsilon = EPSILONS[a.epsilon]
    c = base_config()
    c.name = f"fmnist_user eps={epsilon:g}: user-level DP-SGD linear head on ScatterNet features"
    c.data.name = "fashion_mnist"
    c.data.preprocessing = "unit"  # Tramer & Boneh scatter images in [0, 1]
    c.model.name = "scatternet"
    c.model.norm = "group_norm"  # per-example GroupNorm of the scattering, no parameters
    c.finetune.mode = "head"  # the features are fixed: cached once, the head trained on them
    c.dp.unit = "user"
    c.dp.num_users = 6000  # 60,000 images: 10 per user
    c.dp.examples_per_user = 10
    c.dp.epsilon = epsilon
    c.dp.delta = 1e-5  # < 1 / 6000 users
    c.dp.clip_norm = 0.1
    c.train.batch_size = 1024  # expected USERS per step
    c.train.epochs = 40.0  # passes over the users
    c.train.optimizer = "sgd"
    c.train.learning_rate = 16.0
    c.train.momentum = 0.9
    c.train.microbatch_size = 256  # users per vectorised chunk
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.eval_batch_size = 500
    if a.smoke:
        make_smoke(c, batch_size=32, microbatch_size=32)
        c.dp.num_users = 200  # the 2000-image subset: 10 per user
    return c
