"""Feature-based DP methods (`dpft.linear`) on CIFAR-10-pretrained ResNet-20 features of
Fashion-MNIST at (epsilon 3, delta 1e-5).

    python -m dpft --config configs/fmnist_linear.py:dp_gd --workdir runs/lin_gd
    python -m dpft --config configs/fmnist_linear.py:dp_least_squares --workdir runs/lin_ls
    python -m dpft --config configs/fmnist_linear.py:dp_newton --workdir runs/lin_newton
    python -m dpft --config configs/fmnist_linear.py:dp_fc --workdir runs/lin_fc
    python -m dpft --config configs/fmnist_linear.py:single_step --workdir runs/lin_1step
    python -m dpft --config configs/fmnist_linear.py:dp_gd,smoke --workdir /tmp/lin_smoke

The argument picks ``linear.method`` (default ``dp_gd``); ``smoke`` shrinks the data to a
subset. The 64-d pooled features of the frozen backbone are computed once and cached in
WORKDIR/features, or in ``finetune.cache_dir`` (shared with the ``finetune.mode=head`` runs of
configs/fmnist_resnet20.py); each method then takes seconds. Hyperparameters are those chosen on
a validation split of the private training set at epsilon 3 in
experiments/results/feature_methods.md (study (a)); that tuning is not counted in epsilon. Test
accuracy at epsilon 3 in that study (trained on 54k examples; within a point here): dp_gd ~73%,
dp_fc ~71%, dp_newton ~70%, dp_least_squares ~70%, single_step ~49%. Measured with this config
on all 60k (seed 0): dp_gd 73.43% (test ECE 0.055, NLL 0.81), dp_least_squares 70.19% with test
ECE 0.51: least-squares outputs are regression scores, not logits, so their softmax is nearly
flat (under-confident); its accuracy, not its ECE, is meaningful. The workdir gets config.json,
metrics.jsonl, summary.json (test_accuracy, test_ece, test_mce, test_loss, epsilon, ...),
reliability.png and training_curves.png.

Expected: dp_gd 73.4% test accuracy at epsilon 3.00 (seed 0, all 60k; e2e_runs.md).
"""

from dpft.config import base_config, parse_arg

# method -> (dp.clip_norm, linear overrides): study (a)'s choices at epsilon 3 on Fashion-MNIST.
TUNED = {
    "single_step": (0.5, dict(optimizer="sgd", learning_rate=1.0)),
    "dp_gd": (1.0, dict(steps=100, optimizer="adam", learning_rate=0.05)),
    "dp_least_squares": (1.0, dict(feature_clip=2.0, reg=100.0)),
    "dp_newton": (1.0, dict(feature_clip=5.0, steps=3, reg=1e-3, hessian="bohning")),
    "dp_fc": (
        1.0,
        dict(feature_clip=3.0, steps=30, learning_rate=2.0, cov_fraction=0.3, reg=0.01),
    ),
}


def get_config(arg: str = ""):
    c = base_config()
    c.name = "fmnist_linear"
    c.data.name = "fashion_mnist"
    c.model.name = "resnet20"
    c.model.norm = "frozen_bn"
    c.model.pretrained = "resnet20"
    c.finetune.head_init = "zero"
    c.dp.epsilon = 3.0
    c.dp.delta = 1e-5
    c.eval_batch_size = 500

    import ml_collections

    lin = ml_collections.ConfigDict()
    lin.method = "dp_gd"  # single_step | dp_gd | dp_least_squares | dp_newton | dp_fc
    lin.steps = 1  # optimisation steps (dp_gd, dp_newton, dp_fc)
    lin.learning_rate = 1.0  # single_step, dp_gd, dp_fc
    lin.optimizer = "sgd"  # sgd | adam update (single_step, dp_gd)
    lin.weight_decay = 0.0  # single_step, dp_gd
    lin.feature_clip = 2.0  # L2 clip of each feature vector (dp_least_squares, dp_newton, dp_fc)
    lin.reg = 1.0  # ridge (dp_least_squares), L2 (dp_newton), preconditioner (dp_fc)
    lin.targets = "onehot"  # onehot | pm1 (dp_least_squares)
    lin.budget_split = 0.5  # share of mu^2 on the Gram matrix (dp_least_squares)
    lin.damping = 1.0  # dp_newton
    lin.hessian = "bohning"  # bohning | adaptive (dp_newton)
    lin.hessian_share = 0.5  # share of mu^2 on curvature (dp_newton)
    lin.cov_fraction = 0.3  # share of mu^2 on the covariance (dp_fc)
    c.linear = lin

    a = parse_arg(
        arg,
        config="configs/fmnist_linear.py",
        choices={"method": tuple(TUNED)},
        defaults={"method": "dp_gd"},
        flags=("smoke",),
    )
    method = a.method
    if a.smoke:
        c.data.train_subset = 2000
        c.data.eval_subset = 500
        c.dp.delta = 1e-4
    clip, overrides = TUNED[method]
    c.linear.method = method
    c.dp.clip_norm = clip
    for k, v in overrides.items():
        setattr(c.linear, k, v)
    return c
