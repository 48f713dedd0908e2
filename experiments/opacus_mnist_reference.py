"""The Opacus MNIST example's setting, run with Opacus itself on this machine: the reference
for `configs/mnist_cnn.py`.

Opacus publishes 94.63 +- 0.34% for its MNIST example. This script trains the same network with
Opacus on the same local MNIST files, so that dpft's runs are compared with the peer's on
identical data and hardware rather than with a figure measured elsewhere.

Setting (the Opacus README's command for its example): SampleConvNet, SGD lr 0.25 (no momentum),
noise multiplier 1.3, clip 1.5, batch 240 -> Poisson rate 240/60000, 15 epochs, inputs scaled
to [0, 1] then normalised with mean 0.1307 / std 0.3081, PyTorch default init.

    make bench-peers                                      # installs torch and opacus
    .venv/peers/bin/python -m experiments.opacus_mnist_reference --seeds 0 1 2
    # -> experiments/results/opacus_mnist_reference.json (accuracy per seed, epsilon, wall time)

The model and training loop are written here from the example's description (layer list in
`dpft.models.cnn.SampleConvNet`); Opacus does the per-sample gradients, clipping, noise, Poisson
sampling and RDP accounting.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from dpft.data import datasets

OUT = pathlib.Path(__file__).parent / "results" / "opacus_mnist_reference.json"
MEAN, STD = 0.1307, 0.3081


def _tensors(split: str):
    import torch

    ds = datasets.load("mnist", split)
    x = (ds.images.astype(np.float32) / 255.0 - MEAN) / STD
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    return x, torch.from_numpy(ds.labels.astype(np.int64))


def _net():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def run(seed: int, epochs: int, lr: float, sigma: float, clip: float, batch: int) -> dict:
    import torch
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    xtr, ytr = _tensors("train")
    xte, yte = _tensors("test")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=batch)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    start, steps = time.time(), 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
    wall = time.time() - start
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(xte[i : i + 1000]).argmax(1) == yte[i : i + 1000]).sum())
            for i in range(0, len(yte), 1000)
        )
    return {
        "seed": seed,
        "test_accuracy": correct / len(yte),
        "epsilon_opacus_rdp": float(engine.accountant.get_epsilon(delta=1e-5)),
        "steps": steps,
        "wall_seconds": wall,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=pathlib.Path, default=OUT)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    done = {r["seed"] for r in results["runs"]}
    for seed in args.seeds:
        if seed in done:
            continue
        r = run(seed, args.epochs, lr=0.25, sigma=1.3, clip=1.5, batch=240)
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
        acc = np.array([x["test_accuracy"] for x in results["runs"]]) * 100
        results["mean"], results["std"] = float(acc.mean()), float(acc.std())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    n = len(results["runs"])
    print(f"Opacus: {results['mean']:.2f} +- {results['std']:.2f}% over {n} seeds")


if __name__ == "__main__":
    main()
