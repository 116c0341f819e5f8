"""Every numeric constructor argument of the public classes refuses NaN and infinities, naming itself.

The numeric arguments are found from the signatures (``int`` or ``float`` in the annotation, ``**kwargs`` followed
to the base datamodule), so an argument added later is covered without editing this file; the public classes are
taken from the packages' ``__all__``, so a new class that is not listed in ``BUILDERS`` fails the coverage test.
"""

from __future__ import annotations

import functools
import inspect
import math
import re

import pytest
import torch
from torch import nn

import ccim_lightning.callbacks as callbacks
import ccim_lightning.datamodules as datamodules
import ccim_lightning.debias as debias
from ccim_lightning import CCIMLightningModule, ContextualCausalIntervention
from ccim_lightning.arguments import check_finite_settings, check_float, check_int
from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.dictionary.recipe import DictionaryRecipe


class TinyHost(nn.Module):
    feature_dim = 8

    def forward(self, batch):
        return torch.zeros(len(batch["target"]), self.feature_dim)


HEAD = {"feature_dim": 8, "num_classes": 3, "num_prototypes": 4, "confounder_dim": 6}
#: Each public class with numeric arguments, and the other arguments it needs (no disk access happens in them).
BUILDERS = {
    ContextualCausalIntervention: HEAD,
    CCIMLightningModule: {**HEAD, "backbone": TinyHost()},
    debias.ClusterReweighting: {},
    debias.GroupDRO: {},
    debias.ProductOfExperts: {},
    debias.CLEF: {},
    datamodules.SyntheticContextDataModule: {},
    datamodules.SceneSettings: {},
    datamodules.EmoticDataModule: {"root": "/nonexistent"},
    datamodules.CAERSDataModule: {"root": "/nonexistent"},
    datamodules.GroupWalkDataModule: {"root": "/nonexistent"},
    datamodules.TableDataModule: {"root": "/nonexistent", "table": "t.csv", "class_names": ["a", "b"]},
    datamodules.ContextTransform: {},
    DictionaryRecipe: {},
    callbacks.PredictionWriter: {},
    debias.GroupBalancedReweighting: {},
    callbacks.LastLayerRetraining: {},
    callbacks.WorstGroupValidation: {},
}
#: Public classes without numeric constructor arguments (checked: the coverage test fails if one gains some).
NO_NUMBERS = {
    debias.DebiasMethod,
    callbacks.FiniteLossGuard,
    callbacks.ConfounderDictionaryCallback,  # its numbers are the recipe's
    datamodules.PersonDataModule,
}
NUMERIC = re.compile(r"\b(int|float)\b")


def numeric_parameters(cls: type) -> list[str]:
    """Names of ``cls``'s constructor arguments annotated with int or float (``**kwargs`` followed to the base)."""
    signature = inspect.signature(cls)
    names = [p.name for p in signature.parameters.values() if NUMERIC.search(str(p.annotation))]
    if issubclass(cls, PersonDataModule) and cls is not PersonDataModule:
        names += [name for name in numeric_parameters(PersonDataModule) if name not in signature.parameters]
    return names


def public_classes() -> set[type]:
    found = {ContextualCausalIntervention, CCIMLightningModule, DictionaryRecipe}
    for package in (debias, datamodules, callbacks):
        found |= {obj for name in package.__all__ if inspect.isclass(obj := getattr(package, name))}
    return {cls for cls in found if not issubclass(cls, Exception) and inspect.signature(cls).parameters}


def test_every_public_class_with_numbers_is_covered():
    protocols = {datamodules.DictionaryDataModule, datamodules.IdentifiedDataset}
    for cls in public_classes() - protocols:
        if cls in NO_NUMBERS:
            assert numeric_parameters(cls) == [] or cls is PersonDataModule, cls
        else:
            assert cls in BUILDERS, f"{cls.__name__} has numeric arguments {numeric_parameters(cls)}: add it here"
            assert numeric_parameters(cls), cls
            cls(**BUILDERS[cls])  # the builder's arguments are valid


CASES = [
    pytest.param(cls, name, bad, id=f"{cls.__name__}.{name}={bad}")
    for cls in [*BUILDERS, PersonDataModule]
    for name in numeric_parameters(cls)
    for bad in (math.nan, math.inf, -math.inf)
]


@pytest.mark.parametrize(("cls", "name", "bad"), CASES)
def test_nan_and_inf_are_refused_naming_the_argument(cls, name, bad):
    base = BUILDERS.get(cls, {"root": "/nonexistent"})
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b.*{re.escape(str(bad))}"):
        cls(**{**base, name: bad})


def test_helpers_refuse_what_comparisons_let_through():
    assert check_float("C", "x", 2) == 2.0 and isinstance(check_float("C", "x", 2), float)
    assert check_int("C", "n", torch.tensor(3).item()) == 3
    for bad in (math.nan, math.inf, True, "1", None):
        with pytest.raises(ValueError, match=r"^C: x "):
            check_float("C", "x", bad)
    for bad in (math.nan, 3.0, True, "3"):
        with pytest.raises(ValueError, match=r"^C: n must be an integer"):
            check_int("C", "n", bad)
    with pytest.raises(ValueError, match=r"C: x must be in \[0, 1\), got 1"):
        check_float("C", "x", 1, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"C: n must be an integer >= 1, got 0"):
        check_int("C", "n", 0, 1)
    with pytest.raises(ValueError, match=r"C: opt\['betas'\]\[1\] = nan"):
        check_finite_settings("C", "opt", {"lr": 0.1, "betas": (0.9, math.nan), "params": "ignored"})


def test_context_transform_names_the_bad_entry_of_mean_std_and_sizes():
    with pytest.raises(ValueError, match=r"std\[1\] = nan"):
        datamodules.ContextTransform(std=(0.2, math.nan, 0.2))
    with pytest.raises(ValueError, match=r"std\[0\] must be > 0, got 0"):
        datamodules.ContextTransform(std=(0, 1, 1))
    with pytest.raises(ValueError, match=r"context_size\[1\] must be an integer"):
        datamodules.ContextTransform(context_size=(64, math.inf))


@pytest.mark.parametrize(
    ("optimizer", "lr_scheduler", "match"),
    [
        (functools.partial(torch.optim.AdamW, lr=math.inf), None, r"optimizer AdamW param_groups\[0\]\['lr'\] = inf"),
        (functools.partial(torch.optim.AdamW, lr=math.nan), None, r"optimizer refused its settings.*learning rate"),
        (
            functools.partial(torch.optim.AdamW, weight_decay=math.inf),  # torch accepts it
            None,
            r"param_groups\[0\]\['weight_decay'\] = inf",
        ),
        (
            functools.partial(torch.optim.SGD, lr=0.1),
            functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=math.nan),
            r"lr_scheduler StepLR\['gamma'\] = nan",
        ),
        (
            functools.partial(torch.optim.SGD, lr=0.1),
            functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=math.nan),
            r"lr_scheduler ReduceLROnPlateau\['factor'\] = nan",
        ),
    ],
)
def test_optimizer_and_scheduler_settings_are_checked_at_construction(optimizer, lr_scheduler, match):
    with pytest.raises(ValueError, match=match):
        CCIMLightningModule(**BUILDERS[CCIMLightningModule], optimizer=optimizer, lr_scheduler=lr_scheduler)


def test_valid_optimizer_and_plateau_scheduler_are_accepted():
    module = CCIMLightningModule(
        **BUILDERS[CCIMLightningModule],
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,  # its running 'best' is inf: not a setting
    )
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == 0.1
