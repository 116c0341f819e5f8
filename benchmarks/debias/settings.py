"""The rows of the debiasing study: the ``Setting`` dataclass, the per-method hyper-parameters, the tuning variants,
``--quick``'s rows and how runs are dealt out to worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ccim_lightning import debias as methods

DEFAULT_BIAS = 0.9
DEFAULT_N = 32
BIAS_SWEEP = (0.7, 0.97)
EXTRACTOR = "test_efficientnet"
CONFOUNDER_DIM = 256
KMEANS_ITERATIONS = 25
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: The methods also run on a finer dictionary (``<prefix>_N<FINER_N>``): purer clusters, fewer samples in each.
FINER, FINER_N = ("reweight", "poe"), 128
#: Most epochs of the rows that select their epoch on validation (``select``).
SELECT_EPOCHS = 8
#: The methods also run with epoch selection (``<prefix>_select``), with their weight decay (None: AdamW's 0.01).
SELECTED: dict[str, float | None] = {"poe": None, "group_dro_aligned": 1.0, "clef": None}
#: The pseudo-groups whose worst validation accuracy selects the epoch: per class, bias-aligned and bias-conflicting
#: clusters (coarse groups of prototypes merge them when scenes are many: ``clusters.py``).
SELECT_GROUPS = "aligned"
#: Validation samples (at the training bias, as a user's validation split is) of the rows that select their epoch.
SELECTION_VAL_SIZE = 2000

#: Per-method hyper-parameters used by the benchmark (row name prefix -> class name and keyword arguments).
METHODS: dict[str, tuple[str, dict]] = {
    "reweight": ("ClusterReweighting", {"smoothing": 1.0, "max_weight": 10.0}),
    "group_dro": ("GroupDRO", {"eta": 0.01}),
    "poe": ("ProductOfExperts", {"smoothing": 1.0}),
    "clef": ("CLEF", {"encoder": "small_cnn"}),
    # Pseudo-groups (class, coarse cluster): per class, the prototypes clustered into 2-8 groups by silhouette.
    "group_balanced": ("GroupBalancedReweighting", {"groups": "coarse"}),
    "group_dro_coarse": ("GroupDRO", {"eta": 0.1, "normalize": True, "groups": "coarse"}),
    # Pseudo-groups (class, aligned or not): per class, the clusters where P(y | z) >= P(y) and the others.
    "group_balanced_aligned": ("GroupBalancedReweighting", {"groups": "aligned"}),
    "group_dro_aligned": ("GroupDRO", {"eta": 0.1, "normalize": True, "groups": "aligned"}),
}
#: The method carried into the bias sweep and ``--quick`` (the best at bias 0.9 in the full run).
BEST = "clef"
#: The row of ``--ccim-checkpoint`` (group ``"checkpoint"``: only run when a checkpoint is given).
CHECKPOINT_ROW = "ccim_fit"
#: Relative cost of a run when dealing runs out to workers (CLEF trains a second encoder: 50 s vs 30 s per run on
#: the idle machine; testing a checkpoint is a few seconds).
RUN_COST = {"CLEF": 1.6, "checkpoint": 0.1}


@dataclass(frozen=True)
class Setting:
    """One row of the table, trained once per seed.

    Attributes:
        name: Row name (``--only`` takes it).
        description: What it is, with its hyper-parameters.
        group: ``"main"`` (CCIM and the ablations), ``"method"`` (debiasing methods), ``"oracle"``, ``"sweep"`` or
            ``"tuning"`` (investigations, run only when named with ``--only``).
        attention: ``"dot_product"``, ``"additive"`` or ``"none"``.
        bias: The bias of the training data and of the biased test set.
        train_bias: Bias of the training data when it differs (the oracle: 0); the test sets stay at ``bias``.
        num_prototypes: N.
        use_prior: Multiply by P(z).
        uniform_attention: Uniform lambda.
        source: Dictionary source, ``"features"`` or ``"random"``.
        mask_subject: Mask the subject out of the images the dictionary is built from.
        debias: Class name in ``ccim_lightning.debias``, or None.
        debias_args: Its keyword arguments.
        sampler: Draw training samples with ``ClusterReweighting(**debias_args).sample_weights`` through a
            ``WeightedRandomSampler`` (the method's documented resampling variant) instead of passing ``debias`` to
            the model.
        lr: AdamW learning rate (None: torch's default 1e-3).
        epochs: Training epochs (None: ``--epochs``).
        last_layer: After training, refit the output layer on group-balanced pseudo-groups (``LastLayerRetraining``,
            DFR-style, on the training split): True for coarse groups, or the groups' mode (``"aligned"``).
        select: Validate every epoch on a biased validation split of ``SELECTION_VAL_SIZE`` samples and test the
            epoch with the best worst-pseudo-group accuracy (``WorstGroupValidation`` with ``SELECT_GROUPS``, from
            the dictionary's clusters, never the true scenes); multiclass only.
        weight_decay: AdamW weight decay (None: torch's default 0.01).
    """

    name: str
    description: str
    group: str = "main"
    attention: str = "dot_product"
    bias: float = DEFAULT_BIAS
    train_bias: float | None = None
    num_prototypes: int = DEFAULT_N
    use_prior: bool = True
    uniform_attention: bool = False
    source: str = "features"
    mask_subject: bool = True
    debias: str | None = None
    debias_args: dict = field(default_factory=dict, hash=False)
    sampler: bool = False
    lr: float | None = None
    epochs: int | None = None
    last_layer: bool | str = False
    select: bool = False
    weight_decay: float | None = None

    @property
    def val_size(self) -> int:
        """Validation samples: ``SELECTION_VAL_SIZE`` for the rows that select their epoch, else 1 (not run)."""
        return SELECTION_VAL_SIZE if self.select else 1

    @property
    def data_bias(self) -> float:
        """The bias of the training split."""
        return self.bias if self.train_bias is None else self.train_bias

    @property
    def needs_dictionary(self) -> bool:
        """Whether the head or the method reads the confounder dictionary."""
        method_needs = self.debias is not None and getattr(methods, self.debias).needs_clusters
        return self.attention != "none" or method_needs or self.sampler or bool(self.last_layer) or self.select


def _args_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def method_settings(prefix: str, bias: float = DEFAULT_BIAS, group: str = "method", suffix: str = "") -> list[Setting]:
    """A method of ``METHODS`` on the baseline head (``<prefix>``) and on CCIM (``<prefix>_ccim``)."""
    cls, kwargs = METHODS[prefix]
    what = f"{cls}({_args_text(kwargs)})" + (f", bias {bias:g}" if suffix else "")
    return [
        Setting(f"{prefix}{suffix}", f"{what}, baseline head", group, "none", bias, debias=cls, debias_args=kwargs),
        Setting(f"{prefix}_ccim{suffix}", f"{what} + CCIM dot", group, bias=bias, debias=cls, debias_args=kwargs),
    ]


def all_settings() -> list[Setting]:
    """Every row, in table order."""
    settings = [
        Setting("baseline", "host + head, attention none (no intervention)", attention="none"),
        Setting("ccim_dot", "CCIM, dot-product attention (paper default)"),
        Setting(
            CHECKPOINT_ROW,
            "ccim_dot's model from `ccim fit` (--ccim-checkpoint; validated each epoch, own "
            "dictionary; tested here, not retrained)",
            "checkpoint",
        ),  # fmt: skip
        Setting("ccim_additive", "CCIM, additive attention", attention="additive"),
        Setting("random_dictionary", "ablation: random Z, uniform prior", source="random"),
        Setting("without_lambda", "ablation: uniform attention (without lambda)", uniform_attention=True),
        Setting("without_prior", "ablation: without P(z)", use_prior=False),
        Setting("without_masking", "ablation: dictionary from unmasked images", mask_subject=False),
    ]
    for prefix in METHODS:
        settings += method_settings(prefix)
    dfr = "LastLayerRetraining(groups=coarse) after training"
    settings += [
        Setting("dfr", f"{dfr}, baseline head", "method", "none", last_layer=True),
        Setting("dfr_ccim", f"{dfr} + CCIM dot", "method", last_layer=True),
        Setting("dfr_aligned", "LastLayerRetraining(groups=aligned) after training, baseline head", "method", "none",
                last_layer="aligned"),
    ]  # fmt: skip
    for prefix in FINER:
        cls, kwargs = METHODS[prefix]
        settings.append(
            Setting(f"{prefix}_N{FINER_N}", f"{cls}({_args_text(kwargs)}), N = {FINER_N} prototypes, baseline head",
                    "method", "none", num_prototypes=FINER_N, debias=cls, debias_args=kwargs)
        )  # fmt: skip
    for prefix, decay in SELECTED.items():
        cls, kwargs = METHODS[prefix]
        what = f"{cls}({_args_text(kwargs)})" + ("" if decay is None else f", weight decay {decay:g}")
        what += f", up to {SELECT_EPOCHS} epochs, the epoch of the best worst-pseudo-group validation accuracy"
        settings.append(
            Setting(f"{prefix}_select", what, "method", "none", debias=cls, debias_args=kwargs,
                    epochs=SELECT_EPOCHS, select=True, weight_decay=decay)
        )  # fmt: skip
    settings.append(Setting("oracle", "baseline trained on bias-0 data", "oracle", "none", train_bias=0.0))
    for bias in BIAS_SWEEP:
        settings += [
            Setting(f"baseline_bias{bias:g}", f"baseline, bias {bias:g}", "sweep", "none", bias),
            Setting(f"ccim_dot_bias{bias:g}", f"CCIM dot, bias {bias:g}", "sweep", bias=bias),
            method_settings(BEST, bias, "sweep", f"_bias{bias:g}")[0],
        ]
    settings += tuning_settings()
    return settings


#: Variants tried while tuning: name -> (method key of ``METHODS``, keyword overrides, epochs, learning rate).
TUNING: dict[str, tuple[str, dict, int | None, float | None]] = {
    "reweight_sampler": ("reweight", {}, None, None),
    "reweight_sampler_epochs8": ("reweight", {}, 8, None),
    "reweight_max3": ("reweight", {"max_weight": 3.0}, None, None),
    "reweight_max30": ("reweight", {"max_weight": 30.0}, None, None),
    "reweight_smooth0": ("reweight", {"smoothing": 0.0}, None, None),
    "reweight_epochs8": ("reweight", {}, 8, None),
    "reweight_epochs12": ("reweight", {}, 12, None),
    "reweight_lr3e-3": ("reweight", {}, None, 3e-3),
    "reweight_lr3e-4_epochs8": ("reweight", {}, 8, 3e-4),
    "poe_epochs8": ("poe", {}, 8, None),
    "group_dro_eta0.1": ("group_dro", {"eta": 0.1, "normalize": True}, None, None),
    "group_dro_eta1": ("group_dro", {"eta": 1.0, "normalize": True}, None, None),
    "oracle_epochs8": ("oracle", {}, 8, None),
}


def tuning_settings() -> list[Setting]:
    """The ``TUNING`` variants (baseline head, bias 0.9; run only when named with ``--only``)."""
    rows = []
    for name, (key, overrides, epochs, lr) in TUNING.items():
        extra = "".join(f", {label}" for label, v in ((f"{epochs} epochs", epochs), (f"lr {lr}", lr)) if v)
        if key == "oracle":
            rows.append(Setting(name, f"oracle{extra}", "tuning", "none", train_bias=0.0, epochs=epochs, lr=lr))
            continue
        cls, kwargs = METHODS[key]
        kwargs = {**kwargs, **overrides}
        what = f"{cls}({_args_text(kwargs)}){extra}"
        if "sampler" in name:
            what = f"{cls}({_args_text(kwargs)}) weights in a WeightedRandomSampler{extra}"
            rows.append(Setting(name, what, "tuning", "none", debias_args=kwargs, sampler=True, epochs=epochs, lr=lr))
            continue
        rows.append(Setting(name, what, "tuning", "none", debias=cls, debias_args=kwargs, epochs=epochs, lr=lr))
    return rows


def quick_names(checkpoint: bool = False) -> list[str]:
    """``--quick``: baseline, CCIM (``ccim_fit`` when a checkpoint is given), the best method, the oracle."""
    return ["baseline", CHECKPOINT_ROW if checkpoint else "ccim_dot", BEST, "oracle"]


def run_cost(setting: Setting) -> float:
    """The expected duration of a run of ``setting``, relative to a plain one (see ``RUN_COST``)."""
    if setting.group == "checkpoint":
        return RUN_COST["checkpoint"]
    return RUN_COST.get(setting.debias or "", 1.0)


def deal(plan: list[tuple[int, str]], jobs: int, settings: dict[str, Setting]) -> list[list[tuple[int, str]]]:
    """Splits the plan over ``jobs`` workers: each run goes to the least loaded so far, plan order kept inside."""
    shares: list[list[tuple[int, str]]] = [[] for _ in range(jobs)]
    loads = [0.0] * jobs
    for seed, name in plan:
        worker = loads.index(min(loads))
        shares[worker].append((seed, name))
        loads[worker] += run_cost(settings[name])
    return shares
