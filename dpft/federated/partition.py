"""Seeded splits of a centralized dataset into clients (host-side numpy).

Each function returns a list of ``num_clients`` sorted int64 index arrays into the dataset:
disjoint, covering every example exactly once, client sizes possibly unequal. The split is a
pure function of its arguments (the seed included), so simulations are reproducible.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dirichlet", "iid", "label_skew", "shards"]


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not (isinstance(num_clients, int | np.integer) and 0 < num_clients <= len(labels)):
        raise ValueError(f"num_clients must be an int in [1, {len(labels)}], got {num_clients!r}")
    return labels


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split into ``num_clients`` clients of (almost) equal size.

    Privacy:
        Client membership is assigned without looking at the data; it is public structure.
    """
    labels = _check(labels, num_clients)
    perm = np.random.default_rng([seed, 0]).permutation(len(labels))
    return _finish(np.array_split(perm, num_clients))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives clients dominated by few classes; large ``alpha`` approaches `iid`.
    Every client gets at least one example: clients left empty take one example each from the
    currently largest clients (deterministically given the seed).

    Privacy:
        The split depends on labels; in a simulation it models the (private) client datasets,
        it is not itself released by training.
    """
    labels = _check(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng([seed, 1])
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].extend(chunk.tolist())
    for i in range(num_clients):
        if not parts[i]:
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            take = int(rng.integers(len(parts[donor])))
            parts[i].append(parts[donor].pop(take))
    return _finish(parts)


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """McMahan et al. (2017) pathological non-IID split: sort by label, cut into
    ``num_clients * shards_per_client`` shards and give each client ``shards_per_client``
    random shards. Shard sizes differ by at most one, so client sizes are nearly equal.

    Privacy:
        As for `dirichlet`: a simulation of private client datasets.
    """
    labels = _check(labels, num_clients)
    n_shards = num_clients * int(shards_per_client)
    if not (shards_per_client >= 1 and n_shards <= len(labels)):
        raise ValueError(
            f"need 1 <= num_clients * shards_per_client <= {len(labels)}, got {n_shards}"
        )
    rng = np.random.default_rng([seed, 2])
    tie = rng.permutation(len(labels))  # random order within a class
    order = tie[np.argsort(labels[tie], kind="stable")]
    pieces = np.array_split(order, n_shards)
    assign = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in assign])


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global
    one (0 = IID; close to 1 = each client holds one rare class). For diagnostics and tests.

    Privacy:
        Computed from private labels: not private, do not release it for real client data.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    glob = np.array([np.mean(labels == c) for c in classes])
    tv = []
    for p in parts:
        local = np.array([np.mean(labels[p] == c) for c in classes])
        tv.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tv))
