"""The data and models of `experiments.dpfl_pretraining`, per arm kind.

The fixed ``N_TRAIN``-image training subset and the disjoint ``N_VAL`` validation rows of
Fashion-MNIST's 60k training set (seed ``SUBSET_SEED``); for each kind the ``{'train', 'val',
'test'}`` splits (``{'image', 'label'}``: images, or cached backbone activations / pooled
features), the model, its trainable parameters and the frozen ones: CIFAR-10 ResNet-20 features
or last block (``head_r20``, ``ft_r20``), ImageNet MobileNetV2 features or last blocks
(``head_mnv2``, ``ft_mnv2``), and from scratch the small CNN or ResNet-20 with GroupNorm
(``st_cnn``, ``st_r20``; `scratch_init` draws their initialisation per seed).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from configs import fmnist_fed
from dpft import models
from dpft.train import build
from dpft.train.step import flatten, unflatten
from dpft.train.step import partition as split_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "dpfl_v2_cache"
N_TRAIN = 3000  # the fixed training subset, every arm (30 examples per client)
N_VAL = 1000  # held-out training examples for tuning
SUBSET_SEED = 0


def _indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed training subset and the disjoint validation rows (of the 60k training set)."""
    perm = np.random.default_rng([SUBSET_SEED, 0xDF1]).permutation(60000)
    return np.sort(perm[:N_TRAIN]), np.sort(perm[N_TRAIN : N_TRAIN + N_VAL])


# ------------------------------------------------------------------------------------------
# Data and models: {'train', 'val', 'test'}: {'image', 'label'}, model, params, frozen.

_DATA: dict = {}


def _images(kind: str) -> dict:
    from dpft import data as dpdata

    tr, va = _indices()
    out = {}
    for split in ("train", "test"):
        ds = dpdata.load("fashion_mnist", split)
        x = dpdata.preprocess(np.asarray(ds.images), kind)
        y = np.asarray(ds.labels, np.int32)
        if split == "train":
            out["train"] = {"image": x[tr], "label": y[tr]}
            out["val"] = {"image": x[va], "label": y[va]}
        else:
            out["test"] = {"image": x, "label": y}
    return out


def _r20_arrays() -> tuple[dict, object, dict]:
    """ResNet-20 prefix activations (cached) and pooled features of the three splits."""
    from dpft.data.preprocess import default_preprocessing
    from dpft.models import pretrained
    from dpft.train.features import cached_features, file_identity
    from experiments import common

    model, variables = pretrained.load("resnet20")
    imgs = _images(default_preprocessing("fashion_mnist", "resnet20"))
    tr, va = _indices()
    desc = {
        "backbone": "resnet20",
        "weights": file_identity(pretrained.weights_path("resnet20", None)),
        "prefix_until": common.RESNET20_FT_BLOCKS[0],
        "rows": hashlib.sha1(np.concatenate([tr, va]).tobytes()).hexdigest(),
        "jax": jax.__version__,
    }
    acts = cached_features(
        CACHE,
        desc,
        lambda x: model.apply(variables, x, method=common.resnet20_prefix),
        {k: v["image"] for k, v in imgs.items()},
        250,
    )
    pool = jax.jit(lambda a: model.apply(variables, a, method=common.resnet20_pooled_suffix))
    out = {}
    for k, v in imgs.items():
        feat = np.concatenate([np.asarray(pool(a)) for a in np.array_split(acts[k], 10)])
        out[k] = {"act": acts[k], "feat": feat, "y": v["label"]}
    return out, model, variables


def _mnv2_arrays() -> dict:
    """MobileNetV2 prefix activations of the rows and their pooled 1280-d features.

    Reads `experiments.lp_ft`'s activation cache (all 60k + 10k rows) directly: its key holds
    the weights file's mtime, which changed after it was written (file re-copied, same size), so
    ``lp_ft.load_arrays`` would recompute it; the current weights must reproduce its activations
    on 64 training images. Pooled features are computed for the subset's rows only.
    """
    from dpft import data as dpdata
    from experiments import lp_ft

    tr, va = _indices()
    for js in sorted(lp_ft.CACHE.glob("features-*.json")):
        d = json.loads(js.read_text())
        if (d.get("backbone"), d.get("size"), d.get("prefix_end")) == (
            "mobilenet_v2",
            lp_ft.SIZE,
            lp_ft.PREFIX_END,
        ) and d["splits"]["train"][0] == 60000:
            path = js.with_suffix(".npz")
    _, variables, prefix = lp_ft._backbone()
    ds = {s: dpdata.load("fashion_mnist", s) for s in ("train", "test")}
    with np.load(path) as f:
        acts = {"train": f["train"], "test": f["test"]}
    x = np.asarray(ds["train"].images[:64], np.float32) / 255.0
    err = float(np.max(np.abs(np.asarray(prefix(x)) - acts["train"][:64])))
    if err > 1e-3:
        raise RuntimeError(f"cached MobileNetV2 activations do not match the weights ({err})")
    sv = lp_ft.suffix_variables(variables)
    pooled = jax.jit(lambda a: lp_ft.Suffix().apply(sv, a, method=lp_ft.Suffix.features))
    out = {"check_max_abs_err": err}
    for split, src, rows in (("train", "train", tr), ("val", "train", va), ("test", "test", None)):
        a, y = acts[src], np.asarray(ds[src].labels, np.int32)
        a, y = (a, y) if rows is None else (a[rows], y[rows])
        feat = np.concatenate([np.asarray(pooled(c)) for c in np.array_split(a, len(a) // 1000)])
        out[split] = {"act": a, "feat": feat, "y": y}
    return out


class _Apply:
    def __init__(self, fn):
        self.apply = fn


def _head(dim: int) -> tuple[object, dict]:
    params = {
        "params/linear/kernel": np.zeros((dim, 10), np.float32),
        "params/linear/bias": np.zeros(10, np.float32),
    }
    return models.get_model("linear", 10), params


def data_for(kind: str) -> tuple[dict, object, dict, dict]:
    """``(splits, model, params, frozen)`` of an arm's ``kind`` (cached per kind)."""
    if kind in _DATA:
        return _DATA[kind]
    as_xy = lambda arrs, f: {k: {"image": v[f], "label": v["y"]} for k, v in arrs.items()}  # noqa: E731
    frozen: dict = {}
    if kind in ("head_r20", "ft_r20"):
        arrs, resnet, variables = _r20_arrays()
        if kind == "head_r20":
            splits, (model, params) = as_xy(arrs, "feat"), _head(64)
        else:
            from experiments import common

            flat = {**flatten(variables), **_head(64)[1]}
            params, frozen = split_params(unflatten(flat), (r"layer3_2/.*", r"linear/.*"))
            model = _Apply(lambda v, a: resnet.apply(v, a, method=common.resnet20_logits_suffix))
            splits = as_xy(arrs, "act")
    elif kind in ("head_mnv2", "ft_mnv2"):
        from dpft.models import pretrained
        from experiments import lp_ft

        arrs = _mnv2_arrays()
        print(f"MobileNetV2 cache check: max abs error {arrs.pop('check_max_abs_err', 0):.2e}")
        if kind == "head_mnv2":
            splits, (model, params) = as_xy(arrs, "feat"), _head(1280)
        else:
            sv = lp_ft.suffix_variables(pretrained.load("mobilenet_v2")[1])
            flat = {**flatten(sv), **_head(1280)[1]}
            params, frozen = split_params(unflatten(flat), (".*",))
            model = lp_ft.Suffix()
            splits = as_xy(arrs, "act")
    else:  # from scratch on the images
        from dpft.data.preprocess import default_preprocessing

        c = fmnist_fed.get_config("scratch")
        c.unlock()
        if kind == "st_r20":
            c.model.name, c.model.norm = "resnet20", "group_norm"
        splits = _images(default_preprocessing("fashion_mnist", c.model.name))
        model, params = build.build_model(c, 10, splits["train"]["image"][0])[0], None
    _DATA[kind] = (splits, model, params, frozen)
    return _DATA[kind]


_INIT: dict = {}


def scratch_init(kind: str, seed: int) -> tuple[dict, dict]:
    """A fresh initialisation of a from-scratch kind's model (`build.build_model`, seed)."""
    if (kind, seed) not in _INIT:
        c = fmnist_fed.get_config("scratch")
        c.unlock()
        c.seed = seed
        if kind == "st_r20":
            c.model.name, c.model.norm = "resnet20", "group_norm"
        image = data_for(kind)[0]["train"]["image"][0]
        _INIT[(kind, seed)] = split_params(build.build_model(c, 10, image)[1], (".*",))
    return _INIT[(kind, seed)]
