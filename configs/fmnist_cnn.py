"""Tramer & Boneh (2021)'s end-to-end tanh CNN on Fashion-MNIST at (epsilon 3, delta 1e-5).

    python -m dpft --config configs/fmnist_cnn.py --workdir runs/fmnist_cnn
    python -m dpft --config configs/fmnist_cnn.py:smoke --workdir /tmp/fmnist_smoke   # seconds
    python -m dpft --config configs/fmnist_cnn.py:mf --workdir runs/fmnist_cnn_mf      # BandMF
    python -m dpft --config configs/fmnist_cnn.py:mf,smoke --workdir /tmp/fmnist_mf_smoke

Their setting: batch 2048, 40 epochs, clip 0.1, SGD with momentum 0.9 and learning rate 4, noise
calibrated to epsilon 3; they report 86.0% test accuracy.

Expected: 86.5% test accuracy at epsilon 3.00 (1172 steps, one seed; e2e_runs.md).

Tuning: the hyperparameters are Tramer & Boneh's, chosen by them on this task with a search that
their epsilon does not count; dpft did not retune them. No tuning on private data is counted in
the reported epsilon.

``:mf`` trains the same recipe with correlated noise (``config.dp.noise='banded_mf'``, band 4,
docs/correlated_noise.md): 4 cyclic Poisson partitions at rate 4 B / N each, the same expected
batch and epochs. The band was chosen on the public accounting alone (the analytic error of the
prefix sums at epsilon 3 is lowest at b = 4 among 1, 2, 4, 8, 16, 29 for these 1172 steps), not
on the data.
"""

from dpft.config import base_config, make_smoke, parse_arg


def get_config(arg: str = ""):
    c = base_config()
    c.name = "fmnist_cnn"
    c.data.name = "fashion_mnist"
    c.model.name = "tramer_boneh_cnn"
    c.dp.epsilon = 3.0
    c.dp.delta = 1e-5
    c.dp.clip_norm = 0.1
    c.train.batch_size = 2048
    c.train.epochs = 40.0
    c.train.microbatch_size = 512
    c.train.optimizer = "sgd"
    c.train.learning_rate = 4.0
    c.train.momentum = 0.9
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    a = parse_arg(arg, config="configs/fmnist_cnn.py", flags=("mf", "smoke"))
    if a.mf:  # correlated noise: BandMF with 4 cyclic Poisson partitions
        c.name = "fmnist_cnn_mf"
        c.dp.noise = "banded_mf"
        c.dp.band = 4
    if a.smoke:
        make_smoke(c, batch_size=128, microbatch_size=64)
    return c
