"""A fit job run by tests/callbacks/test_confounder_dictionary_ddp.py as a script (the DDP launcher re-runs it per
rank).

Usage: python tests/callbacks/ddp_dictionary_job.py OUT_DIR DEVICES [--cache FILE] [--uniform] [--fail-rank K]. Each
rank saves the dictionary its head holds when training starts (and the training samples' clusters) to
OUT_DIR/rank<k>.pt. ``--uniform`` trains the "without lambda" head for two steps under the default DDP strategy;
``--fail-rank K`` makes rank K raise while the dictionary build starts.
"""

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks import ConfounderDictionaryCallback
from ccim_lightning.datamodules import SyntheticContextDataModule
from ccim_lightning.dictionary.recipe import DictionaryRecipe
from ccim_lightning.hosts import TwoStreamHost


class SaveDictionary(Callback):
    def __init__(self, out: Path, callback: ConfounderDictionaryCallback) -> None:
        self.out = out
        self.callback = callback

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = pl_module.head
        torch.save(
            {
                "dictionary": head.dictionary.cpu(),
                "prior": head.prior.cpu(),
                "clusters": pl_module.train_clusters.cpu(),
                "inertia": self.callback.last_dictionary.inertia,
                "world_size": trainer.world_size,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class FailingData(SyntheticContextDataModule):
    """Raises on one rank when the dictionary build asks for its dataset."""

    def __init__(self, fail_rank: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_rank = fail_rank

    def dictionary_dataset(self, mask_subject: bool = True):
        if self.trainer.global_rank == self.fail_rank:
            raise OSError(f"injected failure on rank {self.fail_rank}")
        return super().dictionary_dataset(mask_subject)


def main(out: Path, devices: int, cache: str | None, uniform: bool, fail_rank: int | None) -> None:
    L.seed_everything(0)
    # 75 samples over 2 ranks: the DistributedSampler pads one rank with a repeated sample, which must be dropped.
    settings = dict(seed=3, train_size=75, val_size=16, test_size=16, batch_size=16, image_size=32, subject_size=16)
    data = SyntheticContextDataModule(**settings) if fail_rank is None else FailingData(fail_rank, **settings)
    model = CCIMLightningModule(
        TwoStreamHost(feature_dim=16), num_classes=4, num_prototypes=6, confounder_dim=256, uniform_attention=uniform
    )
    dictionary = ConfounderDictionaryCallback(
        DictionaryRecipe(extractor="test_efficientnet", batch_size=8, cache=cache, progress=False)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=out,
        max_epochs=1,
        limit_train_batches=2 if uniform else 1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[dictionary, SaveDictionary(out, dictionary)],
    )
    trainer.fit(model, datamodule=data)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo can abort at exit otherwise (as ccim's close_process_group)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("devices", type=int)
    parser.add_argument("--cache")
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--fail-rank", type=int)
    args = parser.parse_args()
    main(args.out, args.devices, args.cache, args.uniform, args.fail_rank)
