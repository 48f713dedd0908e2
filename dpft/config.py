"""The base config every experiment in configs/ starts from (ml-collections, locked)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every config key with its default; a ``configs/NAME.py`` starts from it and overrides.

    One piece because it is the one list of keys (grouped by section, each commented where it
    is not obvious): a key missing here is refused on the command line, so splitting it would
    only scatter the list.
    """
    c = ml_collections.ConfigDict()
    c.name = ""
    c.seed = 0
    c.tensorboard = True
    c.plots = True  # training_curves.png and reliability.png at the end of a run
    c.eval_batch_size = 1000

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"
    c.data.data_dir = ""  # default: $DPFT_DATA_DIR, else ../shared/data
    c.data.tfds_data_dir = ""
    c.data.preprocessing = ""  # default: per dataset and model
    c.data.train_subset = 0  # 0 = the whole training set
    c.data.eval_subset = 0
    c.data.validation_fraction = 0.0  # > 0: evaluate on a split carved from train
    c.data.eval_split = "test"
    # Augmentation multiplicity (docs/augmult.md): K views per example, their gradients averaged
    # before clipping (one example = one clipping unit); K times the compute per example.
    c.data.augmult = 1
    c.data.augment = ""  # crop_flip | crop | flip | none; "" = none at K=1, else per dataset
    c.data.augment_pad = 4  # crop: pixels of padding on each side
    c.data.augment_pad_mode = "reflect"  # reflect | zero
    # Input pipeline (docs/data.md): memory (the split as one array) | grain (streamed by
    # index through worker processes: decode, random-resized crop / centre crop, normalise).
    c.data.pipeline = "memory"
    c.data.image_size = 0  # grain: crop side in pixels; 0 = keep the images as they are
    c.data.num_workers = -1  # grain: worker processes (-1 = one per core, 0 = none)
    c.data.train_files = ""  # grain: ArrayRecord glob (dpft.data.write_array_record)
    c.data.eval_files = ""  # grain: ArrayRecord glob of the eval split
    c.data.num_classes = 0  # grain with train_files: the number of classes

    c.model = ml_collections.ConfigDict()
    c.model.name = "sample_convnet"
    c.model.norm = ""  # resnets: frozen_bn | group_norm
    c.model.dtype = "float32"  # float32 | bfloat16 (activations; params, sums, noise in fp32)
    c.model.conv = "auto"  # auto | xla | im2col: convolution implementation (dpft.models.conv)
    c.model.init = "default"  # default (flax) | torch (PyTorch's defaults, for PyTorch recipes)
    c.model.pretrained = ""  # e.g. resnet20: load CIFAR-10 weights from the data dir
    c.model.pretrained_path = ""

    c.finetune = ml_collections.ConfigDict()
    c.finetune.mode = ""  # scratch | full | head | partial | lp_ft | bitfit ("" = `trainable`)
    c.finetune.trainable = (".*",)  # regexes over parameter paths, e.g. ("linear/.*",)
    c.finetune.head_init = "keep"  # keep | zero | random (pretrained models)
    c.finetune.lp_fraction = 0.5  # lp_ft: share of the steps (= of the budget) spent in LP
    c.finetune.lp_learning_rate = 0.0  # lp_ft: LP phase learning rate (0 = train.learning_rate)
    c.finetune.feature_cache = True  # head / LP phases train on cached backbone features
    c.finetune.cache_dir = ""  # "" = WORKDIR/features; share one across runs of a study
    # Parameter-efficient fine-tuning (docs/finetune.md): bitfit trains the biases; LoRA adds
    # adapters y = base(x) + (alpha / r) B(A(x)) (B zero-initialised) and trains only those.
    c.finetune.train_head = True  # bitfit / LoRA: also train the head linear/*
    c.finetune.lora_rank = 0  # r; 0 = no adapters
    c.finetune.lora_alpha = 0.0  # scale alpha / r; 0 = alpha = r (scale 1)
    c.finetune.lora_targets = ()  # module-path regexes; () = every Dense and 1x1 Conv but the head

    c.dp = ml_collections.ConfigDict()
    c.dp.epsilon = float("inf")  # target; the run stops before exceeding it
    c.dp.delta = 1e-5
    c.dp.noise_multiplier = -1.0  # < 0: calibrate to (epsilon, delta) for the planned steps
    c.dp.clip_norm = 1.0
    c.dp.clipping = "flat"  # flat | per_layer | auto | global
    # ghost (ghost / book-keeping clipping, the faster path; every registry model is tested
    # equal to vmap) | vmap (per-example gradients); centralized and federated
    c.dp.norms = "ghost"
    c.dp.auto_gamma = 0.01
    c.dp.global_threshold = 0.0  # Z for global clipping; 0 = clip_norm
    c.dp.accountant = "pld"  # pld | rdp
    # independent (DP-SGD) | banded_mf (correlated noise of a band-b Toeplitz factorization with
    # b cyclic Poisson partitions, docs/correlated_noise.md); band = b (1 for independent)
    c.dp.noise = "independent"
    c.dp.band = 1
    # Adaptive quantile clipping (docs/adaptive_clipping.md): the clip norm, starting at
    # clip_norm, tracks this quantile of the per-example norms (0 = off, e.g. 0.5) with the
    # geometric update C <- C exp(-adaptive_lr (b - quantile)); b is the unclipped fraction with
    # count noise std adaptive_count_noise (< 0: expected batch / 20). Flat clipping only.
    c.dp.adaptive_quantile = 0.0
    c.dp.adaptive_lr = 0.2
    c.dp.adaptive_count_noise = -1.0
    # True: sampling and noise seeded from OS entropy, not c.seed (docs/randomness.md); the
    # secret is kept only inside the checkpoints, which must then be protected.
    c.dp.secure_noise = False
    # Privacy unit (docs/user_level.md): example | user. 'user' protects all the examples of a
    # user: users are Poisson-sampled (train.batch_size and train.max_batch_size then count
    # USERS, epochs pass over the users), each brings up to examples_per_user of its examples,
    # clipped as one unit (their mean gradient), and epsilon is user-level. Users are the data's
    # 'user' array if it has one, else num_users public synthetic users (seeded by c.seed).
    c.dp.unit = "example"
    c.dp.num_users = 0
    c.dp.examples_per_user = 0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # EXPECTED logical batch size (Poisson: q = batch_size / N)
    c.train.max_batch_size = 0  # static cap; 0 = overflow probability <= 1e-12 per step
    c.train.microbatch_size = 0  # 0 = the whole padded batch at once; -1 = fit half the memory
    c.train.host_chunk_size = 0  # > 0: gather and accumulate the logical batch in host chunks
    c.train.microbatch_unroll = 0  # 0: on CPU up to 8 microbatches per step unrolled; else K
    c.train.epochs = 1.0
    c.train.steps = 0  # > 0 overrides epochs
    c.train.optimizer = "sgd"  # sgd | adam | adamw | lamb
    c.train.learning_rate = 0.1
    c.train.momentum = 0.0
    c.train.nesterov = False
    c.train.weight_decay = 0.0
    c.train.schedule = "constant"  # constant | cosine | linear
    c.train.warmup_steps = 0
    c.train.end_lr_fraction = 0.0
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2

    c.parallel = ml_collections.ConfigDict()
    c.parallel.data = 1  # data-parallel devices (batch sharded, params replicated); 0 = all
    c.parallel.fsdp = False  # True: params and optimizer state sharded over the data axis
    # Multi-host (dpft/train/distributed.py; README "Launching on a TPU pod"). These describe the
    # launch, not the experiment: they are left out of config.json and its fingerprint.
    c.parallel.multihost = "auto"  # auto: if coordinator_address / a TPU pod | on | off
    c.parallel.coordinator_address = ""  # host:port of process 0 ("" = $DPFT_COORDINATOR / TPU)
    c.parallel.num_processes = 0  # with coordinator_address (0 = $DPFT_NUM_PROCESSES)
    c.parallel.process_id = -1  # this process, in [0, num_processes) (-1 = $DPFT_PROCESS_ID)
    return c


def make_smoke(c: ml_collections.ConfigDict, batch_size: int = 64, microbatch_size: int = 32):
    """Shrinks a config to a run of seconds: small subsets, a few steps, frequent logging."""
    c.data.train_subset = 2000
    c.data.eval_subset = 500
    c.dp.delta = min(c.dp.delta, 1e-4)
    c.train.batch_size = batch_size
    c.train.steps = 6
    c.train.microbatch_size = microbatch_size
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
    return c


def parse_arg(
    arg: str,
    *,
    config: str,
    choices: dict[str, tuple[str, ...]] | None = None,
    flags: tuple[str, ...] = (),
    defaults: dict[str, str | None] | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
    numbers: dict[str, tuple[str, int]] | None = None,
):
    """Parses the ``:ARG`` of ``configs/NAME.py:ARG``: comma-separated parts in any order.

    Each part is one of:

    * a value of a ``choices`` group (``{"mode": ("head", "full")}``): at most one per group;
      a group not named in ``arg`` takes ``defaults[group]`` if given (``None``: the config
      decides), else its first value;
    * a ``flags`` entry (``"smoke"``): ``True`` when present;
    * an ``aliases`` key, replaced by its parts (``{"run": ("scatter",)}``);
    * a ``numbers`` prefix and an integer (``{"size": ("px", 32)}`` accepts ``px64``, integers
      of at least 32): the group is the integer, ``None`` when absent.

    Returns a namespace with one attribute per group and per flag (``args.mode``,
    ``args.smoke``). A part given twice, two values of one group, or anything else raises
    ValueError with one line naming ``config``, the bad part and the accepted values.
    """
    from types import SimpleNamespace

    choices, defaults = choices or {}, defaults or {}
    aliases, numbers = aliases or {}, numbers or {}
    accepted = "; ".join(
        [f"{group}: {'|'.join(values)}" for group, values in choices.items()]
        + [f"{group}: {p}N (N >= {low})" for group, (p, low) in numbers.items()]
        + [f"{a} (= {','.join(parts)})" for a, parts in aliases.items()]
        + list(flags)
    )

    def fail(why: str):
        raise ValueError(f"{config}: {why} in config argument {arg!r} (accepted: {accepted})")

    given = [p.strip() for p in arg.split(",") if p.strip()] if arg else []
    parts = [q for p in given for q in aliases.get(p, (p,))]
    chosen: dict[str, str | int | None] = {}
    for part in parts:
        if parts.count(part) > 1:
            fail(f"{part!r} given twice")
        group = next((g for g, values in choices.items() if part in values), None)
        if group is None:
            for g, (prefix, low) in numbers.items():
                digits = part[len(prefix) :]
                if part.startswith(prefix) and digits.isdigit() and int(digits) >= low:
                    group = g
                    break
            if group is not None:
                part = int(part[len(numbers[group][0]) :])
        if group is None and part not in flags:
            fail(f"unknown config argument {part!r}")
        if group is not None:
            if group in chosen:
                fail(f"{chosen[group]!r} and {part!r} both set {group}")
            chosen[group] = part
    out = {g: chosen.get(g, defaults.get(g, values[0])) for g, values in choices.items()}
    out.update({g: chosen.get(g) for g in numbers})
    out.update({f: f in parts for f in flags})
    return SimpleNamespace(**out)
