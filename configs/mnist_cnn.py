"""The Opacus MNIST example: SampleConvNet, DP-SGD, sigma 1.3, q = 240/60000, 15 epochs, C = 1.5.

    python -m dpft --config configs/mnist_cnn.py --workdir runs/mnist_cnn
    python -m dpft --config configs/mnist_cnn.py:smoke --workdir /tmp/mnist_smoke   # seconds

Opacus reports 94.63 +- 0.34% test accuracy for this setting. dpft's run (3750 steps, seed 0)
reaches the figure recorded in experiments/results/e2e_runs.md, with epsilon reported by PLD and
RDP at delta = 1e-5 in summary.json (``epsilon``, ``epsilon_rdp``).
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
