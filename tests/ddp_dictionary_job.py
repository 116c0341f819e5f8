"""A fit job run by tests/test_ddp.py as a script (Lightning's DDP launcher re-runs the script for each rank).

Usage: python tests/ddp_dictionary_job.py OUT_DIR DEVICES [CACHE_FILE]. Each rank saves the dictionary its head
holds when training starts to OUT_DIR/rank<k>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks import ConfounderDictionaryCallback
from ccim_lightning.datamodules import SyntheticContextDataModule
from ccim_lightning.hosts import TwoStreamHost


class SaveDictionary(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = pl_module.head
        torch.save(
            {"dictionary": head.dictionary.cpu(), "prior": head.prior.cpu(), "world_size": trainer.world_size},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path, devices: int, cache: str | None = None) -> None:
    L.seed_everything(0)
    # 75 samples over 2 ranks: the DistributedSampler pads one rank with a repeated sample, which must be dropped.
    data = SyntheticContextDataModule(
        seed=3, train_size=75, val_size=16, test_size=16, batch_size=16, image_size=32, subject_size=16
    )
    model = CCIMLightningModule(TwoStreamHost(feature_dim=16), num_classes=4, num_prototypes=6, confounder_dim=256)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=out,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ConfounderDictionaryCallback(extractor="test_efficientnet", batch_size=8, cache=cache, progress=False),
            SaveDictionary(out),
        ],
    )
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
