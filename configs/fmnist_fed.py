"""Federated DP on Fashion-MNIST split over 100 clients, FedAvg, delta 1e-5.

    python -m dpft --config configs/fmnist_fed.py --workdir runs/fed_head          # HT
    python -m dpft --config configs/fmnist_fed.py:smoke --workdir /tmp/fed_smoke   # seconds
    python -m dpft --config configs/fmnist_fed.py:scratch,dirichlet,client --workdir runs/fed_st
    python -m dpft --config configs/fmnist_fed.py:client,adaptive --workdir runs/fed_adaptive

Arguments (comma-separated, any order):

* mode: ``head`` (default; HT: zero-initialised head of the CIFAR-10-pretrained ResNet-20 on
  its cached 64-d features), ``full`` (FT: every parameter of the pretrained ResNet-20; slow on
  CPU), ``scratch`` (ST: the small CNN `sample_convnet` from a fresh init), ``lp_ft`` (LP-FT:
  HT for the first half of the rounds at the HT local lr, then FT of every parameter from the
  learned head at ``federated.local_lr``, one budget; the FT learning rate is not tuned);
* partition: ``iid`` (default) or ``dirichlet`` (label skew, alpha 0.5);
* level: ``example`` (default; each client runs DP-SGD on its own data, epsilon covers every
  example of every client) or ``client`` (DP-FedAvg: clipped client updates, server noise,
  epsilon covers a client's whole dataset);
* ``adaptive`` (with ``client``): adaptive quantile clipping of the client updates (Andrew et
  al. 2021, docs/adaptive_clipping.md): the client clip starts at ``federated.client_clip`` and
  tracks the median client update norm (``dp.adaptive_quantile=0.5``, ``dp.adaptive_lr=0.2``,
  count noise std expected clients / 20; with ``smoke`` 2.5, as the default 0.5 would not
  exceed z/2), at the same epsilon;
* ``smoke``: 2,000 training examples over 10 clients, 4 rounds, a few seconds.

Privacy: ``dp.epsilon`` is the target at ``dp.delta``; the noise is calibrated for
``federated.rounds`` rounds at ``federated.level`` (`dpft.federated.accounting`).

The default is HT, IID, example level, epsilon 2, 10 rounds of 3 full-batch local DP-GD steps
per client, local lr 16 and server momentum 0.9, tuned on a validation split of the private
training set by the first version of experiments/dpfl_pretraining.py (its rows are in
experiments/results/dpfl_pretraining_v1.json); that tuning is not counted in epsilon. The
features are cached as in configs/fmnist_resnet20.py (``--config.finetune.cache_dir`` shares
them). `:smoke` (HT on 2,000 examples) checks the pipeline: epsilon 2.0 at delta 1e-4 after 4
rounds, accuracy above chance (0.1).

Expected: 63.2 +- 0.6% test accuracy at epsilon 2 (3 seeds; dpfl_pretraining_v1.json).
"""

from dpft.config import base_config, parse_arg


def _federated(c):
    import ml_collections

    f = ml_collections.ConfigDict()
    f.num_clients = 100
    f.partition = "iid"  # iid | dirichlet | shards
    f.alpha = 0.5
    f.shards_per_client = 2
    f.level = "example"  # example | client | none
    f.algorithm = "fedavg"  # fedavg | fedsgd
    f.rounds = 10
    f.client_rate = 1.0
    f.max_clients = 0
    f.local_steps = 3
    f.local_rate = 1.0  # 1: full local batches (local DP-GD)
    f.local_batch = 0
    f.local_optimizer = "sgd"
    f.local_lr = 16.0  # HT, tuned on a validation split (dpfl_pretraining_v1.json)
    f.local_momentum = 0.0
    f.server_optimizer = "momentum"  # sgd | momentum | adam
    f.server_lr = 1.0
    f.server_momentum = 0.9
    f.client_clip = 1.0
    f.weighting = ""  # "" = uniform at client level, examples otherwise
    f.microbatch_size = 0
    f.client_group = 0  # 0: every client slot in one vmap; G: groups of G run in sequence
    f.log_every = 1
    f.eval_every = 5
    f.checkpoint_every = 5
    c.federated = f


def get_config(arg: str = ""):
    c = base_config()
    c.name = "fmnist_fed"
    c.data.name = "fashion_mnist"
    c.dp.epsilon = 2.0
    c.dp.delta = 1e-5
    c.dp.clip_norm = 1.0
    c.eval_batch_size = 1000
    _federated(c)
    a = parse_arg(
        arg,
        config="configs/fmnist_fed.py",
        choices={
            "mode": ("head", "full", "scratch", "lp_ft"),
            "partition": ("iid", "dirichlet"),
            "level": ("example", "client"),
        },
        flags=("smoke", "adaptive"),
    )
    mode = a.mode
    c.federated.partition = a.partition
    c.federated.level = a.level
    c.finetune.mode = mode
    if mode == "scratch":
        c.model.name = "sample_convnet"
        c.federated.local_rate = 0.1  # local DP-SGD on ~60 of a client's ~600 examples
        c.federated.local_steps = 2
        c.federated.local_lr = 1.0
    else:
        c.model.name = "resnet20"
        c.model.norm = "frozen_bn"
        c.model.pretrained = "resnet20"
        c.finetune.head_init = "zero"
        if mode == "lp_ft":
            c.finetune.lp_fraction = 0.5
            c.finetune.lp_learning_rate = c.federated.local_lr  # the LP phase is HT
    if c.federated.level == "client":
        c.federated.client_clip = 1.0
        c.federated.server_lr = 1.0
    if a.adaptive:
        if a.level != "client":
            raise ValueError(
                f"configs/fmnist_fed.py: 'adaptive' needs 'client' in config argument {arg!r} "
                "(adaptive clipping of the client updates, client level only)"
            )
        c.dp.adaptive_quantile = 0.5  # the median client update norm, from client_clip
        c.dp.adaptive_lr = 0.2
        c.dp.adaptive_count_noise = -1.0  # expected clients per round / 20
    if a.smoke:
        c.data.train_subset = 2000
        c.data.eval_subset = 500
        c.dp.delta = 1e-4
        c.federated.num_clients = 10
        c.federated.rounds = 4
        c.federated.eval_every = 2
        c.federated.checkpoint_every = 2
        c.federated.local_rate = 0.5 if mode != "head" else 1.0
        c.federated.local_steps = 2
        c.eval_batch_size = 250
        if a.adaptive:  # 10 clients: sigma_b must exceed z/2 (z ~ 3.5 here), 10/20 would not
            c.dp.adaptive_count_noise = 2.5
        if mode in ("full", "lp_ft"):
            c.data.train_subset = 200
            c.data.eval_subset = 100
            c.eval_batch_size = 100
    return c
