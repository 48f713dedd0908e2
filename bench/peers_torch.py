"""PyTorch and Opacus peers for ``bench.run``: dpft's models rebuilt in PyTorch, and their steps.

Importing this module needs torch (and opacus for the DP steps); ``bench.steps`` imports it only
when ``--peers`` is on and skips it with a one-line note otherwise.

Each model has the same layers, shapes and parameter count as its flax twin in `dpft.models`
(``build_steps`` reports both counts so a mismatch shows in results.json):

- ``sample_convnet``: the Opacus MNIST example CNN (26,010 parameters).
- ``resnet20``: option-A CIFAR ResNet-20, ``norm='frozen_bn'`` (BatchNorm in inference mode:
  scale and bias trainable, running statistics fixed) or ``'group_norm'`` (``groups`` groups).
- ``linear``: one Linear layer on flattened inputs.
- ``vit_ti16`` (and ``vit_s16`` / ``vit_b16``): timm's own ViT when timm imports, else a
  layer-identical rebuild (`bench.peers_torch_vit`, which says how Opacus is made to
  ghost-clip it).

Frozen BatchNorm is the module `FrozenBatchNorm2d` with its own Opacus grad sampler: Opacus
rejects ``nn.BatchNorm2d`` even in eval mode, and a per-channel affine map with fixed statistics
is what a frozen BN is.

Steps (each a no-argument callable that runs ONE full training step on a fixed batch):

- ``torch_non_private``: forward, mean cross-entropy, backward, SGD step.
- ``opacus_hooks``: ``PrivacyEngine.make_private(grad_sample_mode='hooks')``: per-example
  gradients materialised by hooks, flat clipping, Gaussian noise, SGD.
- ``opacus_ghost``: ``make_private(grad_sample_mode='ghost')`` (fast gradient / ghost clipping):
  per-example norms without per-example gradients, then a second, reweighted backward pass.

Clip norm 1.0, noise multiplier 1.0, no Poisson sampling (the batch is fixed, as for dpft).
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.peers_torch_vit import (
    TIMM_NAMES,
    VIT_SIZES,
    TokenEmbed,
    ViTTwin,
    count_params,
    vit_model,
)

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
#: How the workload note naming the PyTorch model begins (``bench.run`` reads it back).
MODEL_NOTE = "PyTorch/Opacus model: "
LEARNING_RATE = 0.1
BN_EPSILON = 1e-5


def set_threads(n: int | None = None) -> int:
    """Use every core for intra-op work (the same cores XLA uses); returns the count."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class SampleConvNet(nn.Module):
    """The Opacus MNIST example CNN, like `dpft.models.SampleConvNet` (NCHW inputs)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.linear(x)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in inference mode: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``weight`` and ``bias`` are trainable; the statistics are constants that are never updated
    (dpft's ``norm='frozen_bn'``). They are plain tensor attributes, not buffers: Opacus refuses
    trainable modules with buffers, which it assumes are running statistics.
    """

    def __init__(self, channels: int, eps: float = BN_EPSILON):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mean = torch.zeros(channels)
        self.inv_std = torch.rsqrt(torch.ones(channels) + eps)

    def normalized(self, x):
        return (x - self.mean[:, None, None]) * self.inv_std[:, None, None]

    def forward(self, x):
        return self.normalized(x) * self.weight[:, None, None] + self.bias[:, None, None]


def _make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if norm == "group_norm":
        return nn.GroupNorm(groups, channels, eps=BN_EPSILON)
    raise ValueError(f"norm must be 'frozen_bn' or 'group_norm', got {norm!r}")


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm plus the option-A (parameter-free) shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = _make_norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = _make_norm(norm, cout, groups)
        self.stride = stride
        self.extra = cout - cin

    def shortcut(self, x):
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, half))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Option-A CIFAR ResNet (depth 6n+2), like `dpft.models.CifarResNet` (NCHW inputs)."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, norm: str = "frozen_bn", groups: int = 16
    ):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn1 = _make_norm(norm, 16, groups)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.linear(x.mean(dim=(2, 3)))


class LinearHead(nn.Module):
    """One Linear layer on flattened inputs, like `dpft.models.LinearHead`."""

    def __init__(self, in_features: int, num_classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


def get_model(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """The PyTorch twin of ``dpft.models.get_model(name, num_classes, **kwargs)``.

    ``input_shape`` is one example's shape in dpft's layout (NHWC without N).
    ``kwargs`` other than ``norm`` and ``groups`` (e.g. dpft's ``conv``) do not change the
    architecture and are ignored.
    """
    if name == "sample_convnet":
        return SampleConvNet(num_classes)
    if name.startswith("resnet") and name[6:].isdigit():
        return CifarResNet(
            int(name[6:]),
            num_classes,
            norm=kwargs.get("norm", "frozen_bn"),
            groups=kwargs.get("groups", 16),
        )
    if name == "linear":
        return LinearHead(int(np.prod(input_shape)), num_classes)
    if name in VIT_SIZES:
        h, w = input_shape[:2]
        if h != w:
            raise ValueError(f"the ViT twin needs square images, got {h}x{w}")
        return vit_model(name, num_classes, h)
    raise ValueError(f"no PyTorch twin for model {name!r}")


def describe_model(name: str, model: nn.Module) -> str:
    """What the PyTorch rows of workload model ``name`` run, in words (for the report)."""
    if getattr(model, "timm_name", None):
        import timm

        return (
            f"timm {timm.__version__} {model.timm_name} (pretrained=False; class token and "
            "position embedding moved into TokenEmbed for Opacus)"
        )
    if isinstance(model, ViTTwin):
        return f"ViTTwin (bench.peers_torch, layer-identical to timm's {TIMM_NAMES[name]})"
    return f"{type(model).__name__} (bench.peers_torch)"


# --------------------------------------------------------------------------------------------
# Opacus support for FrozenBatchNorm2d
# --------------------------------------------------------------------------------------------

_REGISTERED = False


def _register_opacus_samplers() -> None:
    """Per-example gradients of `FrozenBatchNorm2d` (per-channel sums over H, W) and of
    `TokenEmbed` (the class token's output row; the position embedding's whole output)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(FrozenBatchNorm2d)
    def _frozen_bn_grad_sample(layer, activations, backprops):
        ret = {}
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.einsum(
                "nchw,nchw->nc", layer.normalized(activations[0]), backprops
            )
        if layer.bias.requires_grad:
            ret[layer.bias] = torch.einsum("nchw->nc", backprops)
        return ret

    @register_grad_sampler(TokenEmbed)
    def _token_embed_grad_sample(layer, activations, backprops):
        ret = {}
        if layer.cls.requires_grad:
            ret[layer.cls] = backprops[:, :1, :].unsqueeze(1)
        if layer.pos.requires_grad:
            ret[layer.pos] = backprops.unsqueeze(1)
        return ret

    _REGISTERED = True


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _to_torch(x: np.ndarray) -> torch.Tensor:
    """dpft's NHWC (or [N, D]) batch as a contiguous torch tensor in NCHW (or [N, D])."""
    if x.ndim == 4:
        x = np.transpose(x, (0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def quiet_warnings() -> None:
    """Silence Opacus' per-call UserWarnings (secure RNG off; full backward hooks on inputs that
    need no gradient), which would otherwise print on every timed step."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*Poisson sampling.*")


def _plain_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _opacus_step(model, x, y, mode: str):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    _register_opacus_samplers()
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    engine = PrivacyEngine()
    out = engine.make_private(
        module=model,
        optimizer=opt,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=CLIP_NORM,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        dp_model, dp_opt, criterion, _ = out
    else:
        dp_model, dp_opt, _ = out
        criterion = nn.CrossEntropyLoss()

    def step():
        dp_opt.zero_grad(set_to_none=True)
        criterion(dp_model(x), y).backward()
        dp_opt.step()

    return step


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}
    for mod in ("opacus", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or (timm) a torchvision that does not load
            pass
    return out


def build_steps(
    name: str,
    kwargs: dict,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    opacus_modes: tuple[str, ...] = ("hooks", "ghost"),
) -> tuple[dict, dict]:
    """``({step_name: callable}, info)`` for one workload; Opacus steps (one per
    ``grad_sample_mode`` in ``opacus_modes``) only if it imports.

    ``x`` is dpft's batch (NHWC images or [N, D] features), ``y`` integer labels.
    ``info`` has the trainable parameter count, the model in words (``torch_model``, see
    `describe_model`), any step that could not be built (with the reason) and notes (the
    model, frozen parameters).
    """
    set_threads()
    quiet_warnings()
    torch.manual_seed(0)
    base = get_model(name, num_classes, x.shape[1:], **kwargs)
    xt, yt = _to_torch(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    steps = {"torch_non_private": _plain_step(copy.deepcopy(base), xt, yt)}
    info: dict = {
        "torch_params": count_params(base),
        "torch_model": describe_model(name, base),
        "skipped": {},
        "notes": [],
    }
    info["notes"].append(MODEL_NOTE + info["torch_model"])
    frozen = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    if frozen:
        names = [n for n, p in base.named_parameters() if not p.requires_grad]
        info["notes"].append(
            f"PyTorch/Opacus rows: {frozen:,} parameters frozen ({', '.join(names)}: Opacus "
            "has no per-example gradient rule for them); dpft trains them"
        )
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        info["skipped"]["opacus"] = f"not importable: {e}"
        return steps, info
    for mode in opacus_modes:
        try:
            steps[f"opacus_{mode}"] = _opacus_step(copy.deepcopy(base), xt, yt, mode)
        except Exception as e:  # a peer that cannot run this model is reported, not fatal
            info["skipped"][f"opacus_{mode}"] = f"{type(e).__name__}: {e}"
    return steps, info
