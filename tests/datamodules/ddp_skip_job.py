"""A 2-process gloo run over a table dataset with undecodable images, run by tests/datamodules/test_skips_ddp.py.

Usage: python tests/datamodules/ddp_skip_job.py ROOT OUT_DIR [--fail] (--fail: rank 1 raises in training). The
Lightning DDP launcher re-runs this script per rank.
Batch size 2 in training (a shrunk batch has one sample: BatchNorm), then 1 everywhere (empty batches).
Each rank writes OUT_DIR/rank<k>.json: its datamodule's ``dropped``, its model's ``skipped_batches``, the
predicted sample indices.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from ccim_lightning import CCIMLightningModule
from ccim_lightning.datamodules import TableDataModule


class BatchNormHost(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.feature_dim = 8

    def forward(self, batch):
        pooled = torch.cat([batch["subject"].mean(dim=(2, 3)), batch["context"].mean(dim=(2, 3))], dim=1)
        return self.norm(self.proj(pooled))


class FailsOnRank1(CCIMLightningModule):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            raise RuntimeError("injected failure in rank 1's training step")
        return super().training_step(batch, batch_idx)


def main(root: str, out: Path, fail: bool = False) -> None:
    L.seed_everything(0)
    data = TableDataModule(
        root, table="t.csv", class_names=["a", "b"], batch_size=2, num_workers=0, on_bad_sample="skip",
        context_size=32, subject_size=16,
    )  # fmt: skip
    model = (FailsOnRank1 if fail else CCIMLightningModule)(BatchNormHost(), num_classes=2, attention="none")
    options = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))  # fmt: skip
    trainer = L.Trainer(max_epochs=2, num_sanity_val_steps=0, **options)
    trainer.fit(model, datamodule=data)
    data.batch_size = 1  # in training too: the undecodable training image is an empty batch on its rank
    L.Trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, **options).fit(model, datamodule=data)
    trainer = L.Trainer(**options)
    trainer.validate(model, dataloaders=data.val_dataloader(), verbose=False)
    predictions = L.Trainer(**options).predict(model, dataloaders=data.val_dataloader())
    rank = trainer.global_rank
    report = {
        "dropped": data.dropped,
        "skipped_batches": model.skipped_batches,
        "predicted": sorted(int(i) for p in predictions for i in p["index"]),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), fail="--fail" in sys.argv[3:])
