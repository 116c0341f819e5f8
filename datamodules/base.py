"""The base of the image datamodules: the shared constructor arguments (declared once), splits, loaders, reports.

Subclasses declare only their own arguments and pass the rest on with ``**kwargs``; jsonargparse (LightningCLI)
follows ``**kwargs`` to :class:`PersonDataModule`'s signature, so ``--data.init_args.batch_size`` and the other
shared arguments are listed (``ccim fit --print_config``) and checked for every datamodule.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from ccim_lightning.arguments import check_int
from ccim_lightning.datamodules.common import (
    BadSamples,
    OnBadSample,
    PersonTable,
    check_on_bad_sample,
    note_duplicates,
    note_overlap,
)
from ccim_lightning.datamodules.dataset import (
    DECODER,
    MASK_FILL,
    ImageGroupedSampler,
    PersonImageDataset,
    collate_skipping_none,
    merge_failures_across_ranks,
    new_failure_flags,
    normalize_batch,
)
from ccim_lightning.datamodules.decode import DECODE_RULE
from ccim_lightning.datamodules.inputs import InputSettings, UnsupportedInputsError
from ccim_lightning.datamodules.prepared import (
    PreparedPersonDataset,
    check_prepared_root,
    flip_batch,
    prepared_dataset,
    same_pixels,
)
from ccim_lightning.datamodules.transforms import ContextTransform
from ccim_lightning.logs import report_rank_failure
from ccim_lightning.types import DescribedTransform, NormalizingTransform, ReducingTransform

log = logging.getLogger(__name__)

DECODE_SKIP_KEY = "skipped (image fails to decode)"


def train_drop_last(size: int, batch_size: int, world_size: int = 1) -> bool:
    """Whether a training loader should drop its last batch: only when it would hold exactly one sample.

    A one-sample batch makes BatchNorm fail in training ("Expected more than 1 value per channel"). Lightning's
    distributed sampler gives each of ``world_size`` ranks ``ceil(size / world_size)`` samples.
    """
    per_rank = math.ceil(size / max(world_size, 1))
    return batch_size > 1 and per_rank > 1 and per_rank % batch_size == 1


def transform_signature(transform: Callable) -> dict[str, Any]:
    """``transform.signature()`` when it has one, else its type and ``repr`` (all that can be seen of it)."""
    if isinstance(transform, DescribedTransform):
        return dict(transform.signature())
    # a function names itself; an instance of a class is named by its class (optional attributes: getattr)
    name = getattr(transform, "__qualname__", None) or type(transform).__qualname__
    module = getattr(transform, "__module__", None) or type(transform).__module__
    return {"transform": f"{module}.{name}", "repr": repr(transform)}


class PersonDataModule(L.LightningDataModule):
    """Base of the image datamodules: lazy, checked splits and the loaders; subclasses read the annotations.

    Subclasses set ``dataset_name``, ``num_classes``, ``class_names`` and ``task`` (no disk access in ``__init__``,
    so configs instantiate without the data) and implement :meth:`build_split`; they take ``**kwargs`` and pass
    them here. Hyperparameters of the whole chain are saved here (transforms excepted).

    Reports: :attr:`dropped` holds, per split, what was skipped, left out, repaired or found suspicious (duplicate
    rows, persons in two splits, boxes mostly outside the image), by reason; each split's build logs one warning.
    Images that fail to decode later, in a loader (``"skip"`` mode), are counted there too, from every worker.

    Args:
        root: Dataset root folder.
        context_size: Context image size, an int or (height, width).
        subject_size: Subject crop size, an int or (height, width).
        flip: Random horizontal flips of training samples.
        batch_size: Batch size of every loader. The training loader drops its last batch only when that batch
            would hold a single sample (BatchNorm cannot train on it); a log line says so.
        num_workers: Loader worker processes.
        on_bad_sample: ``"error"`` (default): a missing, unreadable or malformed item is an error naming the file
            and row; ``"skip"``: it is left out, counted and reported.
        train_transform: Replaces the default training transform (``ContextTransform`` contract).
        eval_transform: Replaces the default evaluation transform (also used for the dictionary).
        reduced_decode: Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still gives the subject crop
            and the context at least their output sizes, and make the context from the image box-reduced (PIL
            ``reduce``) the rest of the way its own size allows (``ccim_lightning.datamodules.decode``): faster,
            with pixels a little different from a full decode (about 1-2 grey levels of 255, mean absolute;
            ``benchmarks/data.py`` measures it). ``False``: full-resolution decoding and resizing, exactly the
            earlier outputs. Part of the dictionary signature.
        device_normalize: In a Lightning run (the datamodule given to the trainer), loaders hand uint8 pixels to
            the main process and :meth:`on_after_batch_transfer` normalises and masks them on the device
            (:meth:`normalize_batch`); ``False``, or a loader taken by hand (outside a run, or after it, e.g. for
            ``dataloaders=``), gives the float batches of the CPU path (``PersonImageDataset``). Both give equal
            batches (float rounding).
        group_by_image: The training order keeps the persons of one image together (images shuffled, see
            ``ImageGroupedSampler``), so one decode serves them all; ``False``: plain per-person shuffling. One
            process only: under DDP the training loader shuffles per person (Lightning's distributed sampler).
        allow_absolute_paths: Read image paths that the annotations give as absolute paths. By default they are
            refused, naming the row, as are relative paths that climb out of the root through ``..``
            (``common.path_outside_root``): an annotation file should not choose which files on the machine are
            read.
        prepared_dir: Decode each person once into this folder (``prepare_data``; uint8 subject and context crops
            of the evaluation transform, ``ccim_lightning.datamodules.prepared``), and read every split, the
            dictionary's included, from there: no decoding in the epochs. Training flips run on the batch, on the
            device. Samples equal the on-the-fly evaluation samples; changed sizes, decode settings or image files
            give a new folder (never a stale one). Under DDP one process per node writes (Lightning's
            ``prepare_data``); a shared or node-local folder both work. Needs ``ContextTransform``-style train and
            evaluation transforms that differ only in ``flip``. ``--data.init_args.prepared_dir DIR``.
    """

    dataset_name = "dataset"
    num_classes: int
    class_names: list[str]
    task: str

    def __init__(
        self,
        root: str | os.PathLike,
        context_size: int | tuple[int, int] = 224,
        subject_size: int | tuple[int, int] = 128,
        flip: bool = True,
        batch_size: int = 32,
        num_workers: int = 4,
        on_bad_sample: OnBadSample = "error",
        train_transform: Callable[..., dict[str, Any]] | None = None,
        eval_transform: Callable[..., dict[str, Any]] | None = None,
        reduced_decode: bool = True,
        device_normalize: bool = True,
        group_by_image: bool = True,
        allow_absolute_paths: bool = False,
        prepared_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_on_bad_sample(on_bad_sample)
        check_int(type(self).__name__, "batch_size", batch_size, 1)
        check_int(type(self).__name__, "num_workers", num_workers, 0)
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        self.reduced_decode = reduced_decode
        self.device_normalize = device_normalize
        self.group_by_image = group_by_image
        self.allow_absolute_paths = allow_absolute_paths
        self.train_transform = train_transform or ContextTransform(context_size, subject_size, flip=flip)
        self.eval_transform = eval_transform or ContextTransform(context_size, subject_size, flip=False)
        self.prepared_dir = None if prepared_dir is None else Path(prepared_dir).expanduser()
        if self.prepared_dir is not None:
            check_prepared_root(self.prepared_dir)
            same_pixels(self.train_transform, self.eval_transform, reduced_decode)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._dropped: dict[str, dict[str, int]] = {}
        self._tables: dict[str, PersonTable] = {}
        self._failures: dict[str, torch.Tensor] = {}
        self._failures_reported: dict[str, int] = {}
        self._drop_last_logged = False

    # --- subclass points -------------------------------------------------------------------------------------------
    def build_split(self, split: str, bad: BadSamples) -> PersonTable:
        """Reads split ``split`` of the annotations and checks its images (see ``common.scan_images``)."""
        raise NotImplementedError

    def split_source(self, split: str) -> str:
        """Where ``split`` is read from (files or folders), for messages."""
        return str(self.root)

    def make_dataset(self, split: str, transform: Callable, mask_subject: bool) -> Dataset:
        """The dataset of a split (default: images decoded from :attr:`image_root`, or read from ``prepared_dir``)."""
        if self.prepared_dir is not None:
            # a single process builds a missing folder itself; under DDP prepare_data has written it
            single = self.trainer is None or self.trainer.world_size == 1
            augment = transform is self.train_transform and bool(getattr(transform, "flip", False))
            return self.prepared_split(split, mask_subject, augment, build=single)
        return PersonImageDataset(
            self.image_root,
            self.table(split),
            transform,
            mask_subject,
            self.on_bad_sample,
            f"{self.dataset_name} {split}",
            failures=self.failure_flags(split),
            reduced_decode=self.reduced_decode,
        )

    def prepared_split(
        self, split: str, mask_subject: bool = True, augment: bool = False, build: bool = True
    ) -> PreparedPersonDataset:
        """``split`` read from ``prepared_dir`` (written first when missing and ``build``); see ``prepared.py``."""
        if self.prepared_dir is None:
            raise RuntimeError(f"{type(self).__name__}: prepared_split needs prepared_dir")
        # the evaluation transform, masked: its uint8 samples carry the mask box; masking itself happens on read
        source = PersonImageDataset(
            self.image_root, self.table(split), self.eval_transform, True, self.on_bad_sample,
            f"{self.dataset_name} {split}", failures=self.failure_flags(split), reduced_decode=self.reduced_decode,
        )  # fmt: skip
        return prepared_dataset(
            self.prepared_dir, source, split, type(self).__name__, mask_subject=mask_subject, augment=augment,
            build=build, num_workers=self.num_workers,
        )  # fmt: skip

    @override
    def prepare_data(self) -> None:
        """With ``prepared_dir``: decodes the splits the run needs into it (Lightning: one process per node)."""
        if self.prepared_dir is None:
            return
        stage = self.trainer.state.fn if self.trainer is not None else None
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(str(stage.value) if stage is not None else "", ("train", "val", "test")):
            self.prepared_split(split)

    @property
    def image_root(self) -> Path:
        """The folder the tables' image paths are relative to."""
        return self.root

    # --- splits and reports ----------------------------------------------------------------------------------------
    def check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.dataset_name} root {self.root} does not exist or is not a folder; pass the dataset folder "
                "as root (--data.init_args.root /path/to/data)"
            )

    def table(self, split: str) -> PersonTable:
        """The checked persons of ``split`` (built on first use, then cached)."""
        if split not in self._tables:
            self.check_root()
            bad = BadSamples(self.dataset_name, split, self.on_bad_sample)
            table = self.build_split(split, bad)
            note_duplicates(table, bad)
            note_overlap(table, split, self._tables, bad)
            self._dropped[split] = bad.report(len(table))
            if len(table) == 0:
                raise ValueError(
                    f"{self.dataset_name} {split}: no usable samples in {self.split_source(split)} (the split is "
                    f"empty or every row was left out: {self._dropped[split] or 'nothing counted'}); check that "
                    "file, or the on_bad_sample report above"
                )
            self._tables[split] = table
        return self._tables[split]

    def failure_flags(self, split: str) -> torch.Tensor:
        """The split's shared decode-failure flags (one per sample), created before any loader starts workers."""
        if split not in self._failures:
            self._failures[split] = new_failure_flags(len(self.table(split)))
        return self._failures[split]

    @property
    def dropped(self) -> dict[str, dict[str, int]]:
        """Per split: what was skipped, left out, repaired or found suspicious, by reason (class docstring).

        Includes the samples that failed to decode in a loader so far (``"skipped (image fails to decode)"``),
        counted once per sample across epochs and worker processes.
        """
        report = {split: dict(counts) for split, counts in self._dropped.items()}
        for split, flags in self._failures.items():
            failed = int(flags.sum())
            if failed:
                report.setdefault(split, {})[DECODE_SKIP_KEY] = failed
        return report

    def report_decode_failures(self) -> dict[str, int]:
        """Logs a warning for each split with samples that failed to decode since the last call; returns all counts.

        The warning names the files (the first ten); under DDP only rank 0 logs it (after :meth:`teardown` merged
        every rank's skips into its flags).
        """
        counts = {}
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        for split, flags in self._failures.items():
            failed = int(flags.sum())
            counts[split] = failed
            if failed > self._failures_reported.get(split, 0):
                if rank_zero:
                    paths = self._tables[split].paths
                    files = list(dict.fromkeys(paths[i] for i in torch.nonzero(flags).flatten().tolist()))
                    more = f" and {len(files) - 10} more" if len(files) > 10 else ""
                    log.warning(
                        "%s %s: %d samples skipped so far because their image failed to decode (on_bad_sample="
                        "'skip'); they are counted in datamodule.dropped[%r]. Files: %s%s",
                        *(self.dataset_name, split, failed, split, ", ".join(files[:10]), more),
                    )
                self._failures_reported[split] = failed
        return counts

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Lightning hook, on the failing rank: its exception logged at once, with the rank (``logs`` module)."""
        report_rank_failure(exception)

    @override
    def teardown(self, stage: str) -> None:
        """Reports decode-time skips at the end of each fit/validate/test/predict run, every rank's on rank 0.

        Lightning calls it on every rank after a run that ended normally, so the flags are merged across ranks here
        (a collective, over the splits in one order) before rank 0 reports them.
        """
        if self.trainer is not None and self.trainer.world_size > 1:
            for split in sorted(self._failures):
                merge_failures_across_ranks(self._failures[split], self.trainer.strategy.root_device)
        self.report_decode_failures()

    @override
    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the splits the stage needs (``fit``: train and val; ``test``/``predict``: test)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.make_dataset("train", self.train_transform, True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self.make_dataset("val", self.eval_transform, True)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self.make_dataset("test", self.eval_transform, True)

    # --- loaders ---------------------------------------------------------------------------------------------------
    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) of the evaluation transform, what :meth:`normalize_batch` applies (None: not known)."""
        transform = self.eval_transform
        if not isinstance(transform, NormalizingTransform) or transform.mean is None or transform.std is None:
            return None
        return tuple(transform.mean), tuple(transform.std)

    def normalize_batch(self, batch: Any) -> Any:
        """A uint8 batch (``output="uint8"`` samples) as the float batch schema, on its device; others unchanged.

        What :meth:`on_after_batch_transfer` runs. A loop outside Lightning that iterates a ``uint8`` loader (e.g.
        ``dataset.with_output("uint8")``) calls it after moving the batch to the device.
        """
        normalization = self.normalization
        if normalization is None:
            return batch
        return normalize_batch(batch, *normalization)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook: flips prepared training batches, normalises and masks uint8 batches, on the device."""
        return self.normalize_batch(flip_batch(batch))

    def _device_side(self, dataset: Dataset) -> bool:
        """Whether ``dataset``'s loader may give uint8 batches: only where this datamodule's hook will see them."""
        if not (self.device_normalize and isinstance(dataset, (PersonImageDataset, PreparedPersonDataset))):
            return False
        transform = dataset.transform
        if not isinstance(transform, ReducingTransform):  # cannot give uint8 pixels
            return False
        if (tuple(transform.mean), tuple(transform.std)) != self.normalization:
            return False
        # only while the trainer runs with this datamodule, i.e. when Lightning itself asks for the loader: a loader
        # taken by hand later (e.g. passed as ``dataloaders=``) would not see this datamodule's hook
        trainer = self.trainer
        if trainer is None or trainer.datamodule is not self:
            return False
        return trainer.state.status == TrainerStatus.RUNNING

    def _loader(
        self,
        dataset: Dataset | None,
        shuffle: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        device_side: bool = True,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        if device_side and self._device_side(dataset):
            dataset = dataset.with_output("uint8")
        sampler = None
        # one process only: under DDP Lightning shards the sampler's order by striding, which partitions the
        # samples only if every rank drew the same order; its own DistributedSampler guarantees that
        single = self.trainer is None or self.trainer.world_size == 1
        if shuffle and single and self.group_by_image and isinstance(dataset, PersonImageDataset):
            sampler, shuffle = ImageGroupedSampler(dataset.table.paths), False
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_skipping_none,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _train_drop_last(self, size: int) -> bool:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        drop = train_drop_last(size, self.batch_size, world_size)
        if drop and not self._drop_last_logged:
            log.info(
                "%s train: %d samples (%d per rank) leave a last batch of one sample, which BatchNorm cannot train "
                "on; that batch is dropped each epoch (a different sample each time, as batches are shuffled)",
                *(self.dataset_name, size, math.ceil(size / world_size)),
            )
            self._drop_last_logged = True
        return drop

    @override
    def train_dataloader(self) -> DataLoader:
        size = len(self.train_dataset) if self.train_dataset is not None else 0
        return self._loader(self.train_dataset, shuffle=True, drop_last=self._train_drop_last(size))

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test split."""
        return self._loader(self.test_dataset)

    # --- confounder dictionary -------------------------------------------------------------------------------------
    def dictionary_dataset(self, mask_subject: bool = True) -> Dataset:
        """The training split in its fixed order, with the evaluation transform, for the confounder dictionary.

        Args:
            mask_subject: Fill the subject box of ``context`` with zeros (the paper's setting); ``False`` gives
                the "without masking" ablation.
        """
        return self.make_dataset("train", self.eval_transform, mask_subject)

    def dictionary_signature(self) -> dict[str, Any]:
        """Everything about the dictionary's input pixels that its cache key must include.

        The evaluation transform's signature (context size, normalisation mean/std, resize interpolation; a
        transform without a ``signature()`` method is described by its type and ``repr``), how files are decoded,
        and the masking fill value. Which samples are in the split, and their files' sizes and modification times,
        are in the dataset's ``sample_identities()``. With ``reduced_decode`` the reduction rule and the subject
        size (which, with the context size, sets each image's reduction) are included.
        """
        return {
            "datamodule": type(self).__name__,
            **transform_signature(self.eval_transform),
            "pixels": self.pixel_source(),
            "decode": self.decode_signature(),
            "mask_fill": MASK_FILL,
        }

    def decode_signature(self) -> dict[str, Any] | str:
        """How the dictionary's images are decoded: ``"full"``, or the reduction rule and the sizes that set it."""
        transform = self.eval_transform
        if not (self.reduced_decode and isinstance(transform, ReducingTransform)):
            return "full"
        return {"rule": DECODE_RULE, "subject_size": list(transform.subject_size)}

    def input_settings(self) -> InputSettings:
        """The test split's input settings, stored in checkpoints for ``ccim_lightning.inference.Predictor``.

        Raises:
            UnsupportedInputsError: The evaluation transform was replaced by one that is not a ``ContextTransform``
                (its pixels cannot be rebuilt from settings).
        """
        transform = self.eval_transform
        if not isinstance(transform, ContextTransform):
            raise UnsupportedInputsError(
                f"{type(self).__name__} was trained with eval_transform={transform!r}, not a ContextTransform, so "
                "its evaluation inputs cannot be rebuilt from a checkpoint; preprocess new images with that "
                "transform yourself and call the model"
            )
        return InputSettings(
            datamodule=type(self).__name__,
            context_size=transform.context_size,
            subject_size=transform.subject_size,
            mean=transform.mean,
            std=transform.std,
            reducing_gap=transform.reducing_gap,
            mask_subject=True,  # setup() masks the val/test splits
            mask_fill=MASK_FILL,
            reduced_decode=self.reduced_decode,
            decoder=DECODER,
            decode_rule=DECODE_RULE if self.reduced_decode else "full",
            pixel_source=self.pixel_source(),
        )

    def pixel_source(self) -> str:
        """How pixels are obtained (default: image files decoded by :data:`~.dataset.DECODER`)."""
        return DECODER

    def dictionary_dataloader(self, batch_size: int | None = None, mask_subject: bool = True) -> DataLoader:
        """A non-shuffled loader over ``dictionary_dataset(mask_subject)`` (float batches: the CPU path).

        Args:
            batch_size: Defaults to the datamodule's batch size.
            mask_subject: See ``dictionary_dataset``.
        """
        return self._loader(self.dictionary_dataset(mask_subject), batch_size=batch_size, device_side=False)
