"""WorstGroupValidation: the worst-group accuracy by hand, and its use as a ModelCheckpoint monitor from the CLI."""

from pathlib import Path

import pytest
import torch

from ccim_lightning.callbacks import WorstGroupValidation
from ccim_lightning.callbacks.worst_group import worst_group_accuracy


def test_worst_group_accuracy_by_hand():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1, 3])
    correct = torch.tensor([1.0, 1, 0, 0, 1, 1, 1, 1, 0, 0, -1])  # sample 9 has no group, sample 10 not evaluated
    # group 0: 2/3, group 1: 1/2, group 2: 3/4, group 3: no evaluated sample.
    assert worst_group_accuracy(correct, groups, 4) == (pytest.approx(0.5), 3)
    assert worst_group_accuracy(correct, groups, 4, min_group_size=3) == (pytest.approx(2 / 3), 2)
    assert worst_group_accuracy(correct, groups, 4, min_group_size=5) == (None, 0)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="min_group_size"):
        WorstGroupValidation(min_group_size=0)
    with pytest.raises(ValueError, match="'prototypes', 'coarse' or 'aligned'"):
        WorstGroupValidation(groups="scenes")


def test_aligned_groups_of_validation_samples_come_from_the_training_counts():
    from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey

    # Training: cluster 0 holds 3 x class 0 and 1 x class 1, cluster 1 holds 1 x class 0 and 3 x class 1;
    # P(y) = 0.5, so class 0 is aligned in cluster 0 (0.75) and conflicting in cluster 1 (0.25), and the reverse.
    train_clusters = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    train_labels = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
    key = DictionaryKey("x", "y", 2, True, 0, "features", 25, None, "none", "f")
    dictionary = ConfounderDictionary.from_clustering(torch.tensor([[0.0], [1.0]]), torch.tensor([4, 4]), key,
                                                      assignments=train_clusters, targets=train_labels)  # fmt: skip
    callback = WorstGroupValidation(groups="aligned")
    val_clusters, val_labels = torch.tensor([0, 1, 0, 1, -1]), torch.tensor([0, 0, 1, 1, -1])
    groups = callback.assign_groups(dictionary, val_clusters, val_labels, num_classes=2)
    # group 2y aligned, 2y + 1 conflicting; -1 for an undecoded sample
    assert groups.tolist() == [0, 1, 3, 2, -1] and callback.num_groups == 4


SYNTHETIC = str(Path(__file__).parents[2] / "configs" / "synthetic.yaml")


@pytest.mark.slow
def test_selects_checkpoints_by_worst_group_accuracy_from_the_cli(tmp_path, monkeypatch):
    from ccim_lightning.commands.cli import build_cli

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", SYNTHETIC, "--data.init_args.train_size=96", "--data.init_args.val_size=64",
            "--data.init_args.test_size=32", "--data.init_args.image_size=32", "--data.init_args.subject_size=16",
            "--data.init_args.num_workers=0", "--model.init_args.num_prototypes=8", "--dictionary.num_iterations=5",
            "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--model.init_args.attention=none",
            "--trainer.callbacks+=ccim_lightning.callbacks.WorstGroupValidation",
            "--trainer.callbacks.min_group_size=1",
            "--checkpoint.monitor=val/worst_group_acc", "--checkpoint.mode=max"]  # fmt: skip
    cli = build_cli(args)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, WorstGroupValidation))
    logged = float(cli.trainer.callback_metrics["val/worst_group_acc"])
    # By hand: the final model's correctness on the validation split, grouped by the callback's groups.
    model, data = cli.model.eval(), cli.datamodule
    right = torch.full((len(data.val_dataset),), -1.0)
    with torch.no_grad():
        for batch in data.val_dataloader():
            right[batch["index"]] = (model(batch).argmax(dim=1) == batch["target"]).float()
    groups = callback.val_groups
    assert groups.shape == (64,) and (groups >= 0).all()
    accuracies = [float(right[groups == g].mean()) for g in groups.unique()]
    assert logged == pytest.approx(min(accuracies))
    assert float(cli.trainer.callback_metrics["val/groups"]) == len(accuracies)
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/worst_group_acc" and Path(best.best_model_path).is_file()
