"""The Opacus MNIST example: SampleConvNet, DP-SGD, sigma 1.3, q = 240/60000, 15 epochs, C = 1.5.

    python -m dpft --config configs/mnist_cnn.py --workdir runs/mnist_cnn
    python -m dpft --config configs/mnist_cnn.py:smoke --workdir /tmp/mnist_smoke   # seconds

Opacus publishes 94.63 +- 0.34% test accuracy for this setting. Expected here: about 94.2%
(seeds 0-3: 94.19 +- 0.25%; Opacus 1.6 itself on the same data and machine, via
experiments/opacus_mnist_reference.py: 94.43 +- 0.42%), epsilon 0.834 (PLD) / 0.922 (RDP) at
delta = 1e-5 in summary.json (``epsilon``, ``epsilon_rdp``); those seeds used ``dp.norms='vmap'``.
With the default ghost norms and ``model.conv = 'xla'`` (set below) seed 0 gives 94.57%.
Details: experiments/results/e2e_runs.md.

Tuning: the hyperparameters are the Opacus example's, not tuned here; whatever search chose them
is not counted in the reported epsilon.
"""

from dpft.config import base_config, make_smoke


def get_config(arg: str = ""):
    c = base_config()
    c.name = "mnist_cnn"
    c.data.name = "mnist"
    c.model.name = "sample_convnet"
    c.model.init = "torch"  # PyTorch default initialisation, as in the Opacus example
    c.dp.noise_multiplier = 1.3
    c.dp.clip_norm = 1.5
    c.dp.delta = 1e-5
    # Ghost norms (the default dp.norms) build their own patches for the kernel gradients:
    # XLA's convolution for the forward pass is then fastest (make bench: 29-30 ms per DP
    # step vs 31-32 with auto).
    c.model.conv = "xla"
    c.train.batch_size = 240  # Poisson rate 240 / 60000 = 0.004
    c.train.epochs = 15.0
    c.train.microbatch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.25
    c.train.log_every = 125
    c.train.eval_every = 750
    c.train.checkpoint_every = 750
    if arg == "smoke":
        make_smoke(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (expected '' or 'smoke')")
    return c
