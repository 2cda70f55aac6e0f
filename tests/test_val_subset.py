"""Validation on a fixed, seeded subset of the val LMDB (configs/s2ef/{2M,all}/base.yml:
``dataset.val.sample_n`` / ``dataset.val.seed``), through fairchem's own path: the CLI's
build_config, OCPTrainer.load_datasets (val inherits the train settings, then create_dataset),
its val loader and sampler. The test numbers of a run trained that way stay full-split
(leignn-evaluate's split_loader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leignn_ocp import lineup
from leignn_ocp.testing import emt_slab_frames, write_s2ef_lmdb

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, SUBSET = 6, 40, 12


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("val_subset")
    frames = emt_slab_frames(N_TRAIN + N_VAL, seed=3)
    write_s2ef_lmdb(frames[:N_TRAIN], root / "train")
    write_s2ef_lmdb(frames[N_TRAIN:], root / "val")  # sid = 0 .. N_VAL-1
    return {"train": root / "train", "val": root / "val"}


def _config(lmdbs, run_dir: Path, *extra: str, size: str = "2M") -> dict:
    """``fairchem --mode train --config-yml configs/s2ef/<size>/leignn.yml ...`` as fairchem's
    parser and build_config make it, on the small LMDBs and a tiny LEIGNN."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config

    tiny = [f"--model.{k}={v}" for k, v in lineup.get("leignn").tiny.items()]
    argv = ["--mode", "train", "--config-yml", str(REPO / f"configs/s2ef/{size}/leignn.yml"), "--cpu", "--debug",
            "--run-dir", str(run_dir), f"--dataset.train.src={lmdbs['train']}", f"--dataset.val.src={lmdbs['val']}",
            f"--dataset.val.sample_n={SUBSET}", "--optim.num_workers=0", "--optim.eval_batch_size=5", *tiny, *extra]
    args, override = flags.get_parser().parse_known_args(argv)
    return build_config(args, override)


def _trainer(config: dict):
    """The trainer fairchem's new_trainer_context builds from ``config`` (no process group)."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    import leignn_ocp  # noqa: F401  (registers the model)

    setup_imports(config)
    return registry.get_trainer_class(config["trainer"])(
        task=config.get("task", {}), model=config["model"], outputs=config["outputs"], dataset=config["dataset"],
        optimizer=config["optim"], loss_functions=config["loss_functions"],
        evaluation_metrics=config["evaluation_metrics"], identifier=config["identifier"],
        timestamp_id=config["timestamp_id"], run_dir=config["run_dir"], is_debug=config["is_debug"],
        print_every=config["print_every"], seed=config["seed"], logger=config["logger"], local_rank=0,
        amp=False, cpu=True, slurm={}, name="ocp", gp_gpus=None,
    )


def _sids(loader) -> list[int]:
    """The structures one validation pass scores, in order."""
    return [int(s) for batch in loader for s in batch.sid]


def _close(trainer) -> None:
    """py-lmdb opens one folder once per process: free the trainer's before the next opens them."""
    from leignn_ocp.evaluation.checkpoints import close_lmdb

    for loader in (trainer.train_loader, trainer.val_loader):
        close_lmdb(loader)


def _val_subset(lmdbs, tmp_path, *extra: str) -> list[int]:
    trainer = _trainer(_config(lmdbs, tmp_path, *extra))
    try:
        return _sids(trainer.val_loader)
    finally:
        _close(trainer)


@pytest.mark.parametrize("size", ["2M", "all"])
def test_large_sizes_validate_on_a_fixed_30k_of_val_id(size):
    val = lineup.load_config(REPO / f"configs/s2ef/{size}/leignn.yml")["dataset"]["val"]
    assert val["src"] == "data/s2ef/all/val_id"
    assert (val["sample_n"], val["seed"]) == (30000, 0)


def test_every_evaluation_and_every_construction_scores_the_same_subset(lmdbs, tmp_path):
    trainer = _trainer(_config(lmdbs, tmp_path))
    try:
        assert trainer.config["val_dataset"]["sample_n"] == SUBSET and "sample_n" not in trainer.config["dataset"]
        assert len(trainer.train_dataset) == N_TRAIN  # the train split is not subsampled
        first = _sids(trainer.val_loader)
        assert len(first) == SUBSET == len(set(first)) and set(first) <= set(range(N_VAL))
        assert first != list(range(SUBSET))  # a random sample, not the first n
        assert _sids(trainer.val_loader) == first  # the next evaluation
    finally:
        _close(trainer)
    # another process / rank / run: other global RNG state, other --seed, same dataset seed
    torch.manual_seed(12345)
    assert _val_subset(lmdbs, tmp_path, "--seed", "7") == first
    other = _val_subset(lmdbs, tmp_path, "--dataset.val.seed=1")
    assert len(other) == SUBSET and set(other) != set(first)


def test_ranks_split_the_one_subset(lmdbs, tmp_path, monkeypatch):
    """Under DDP every rank builds the same subset and fairchem's sampler deals it out."""
    from fairchem.core.common import distutils

    trainer = _trainer(_config(lmdbs, tmp_path))
    try:
        subset = {int(trainer.val_dataset[i].sid) for i in range(len(trainer.val_dataset))}
        monkeypatch.setattr(distutils, "get_world_size", lambda: 2)
        seen = []
        for rank in (0, 1):
            monkeypatch.setattr(distutils, "get_rank", lambda r=rank: r)
            sampler = trainer.get_sampler(trainer.val_dataset, 5, shuffle=False)
            seen.append({int(s) for b in trainer.get_dataloader(trainer.val_dataset, sampler) for s in b.sid})
        assert seen[0] | seen[1] == subset and seen[0] and seen[1]
        assert len(seen[0] & seen[1]) <= 1  # at most the padding DistributedSampler repeats
    finally:
        _close(trainer)


def test_sample_n_none_on_the_command_line_validates_on_the_full_split(lmdbs, tmp_path):
    assert sorted(_val_subset(lmdbs, tmp_path, "--dataset.val.sample_n=None")) == list(range(N_VAL))


def test_a_checkpoint_trained_on_the_subset_is_tested_on_the_full_split(lmdbs, tmp_path):
    """leignn-evaluate (quick / table) rebuilds the trainer from the checkpoint and loads each
    split with split_loader: the val subset keys must not reach it."""
    from leignn_ocp.evaluation.checkpoints import close_lmdb, load_trainer, split_loader

    trainer = _trainer(_config(lmdbs, tmp_path))
    try:
        ckpt_dir = Path(trainer.config["cmd"]["checkpoint_dir"])
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        trainer.is_debug = False  # save() writes nothing in debug mode
        ckpt = trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
    finally:
        _close(trainer)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
    assert saved["val_dataset"]["sample_n"] == SUBSET  # the run did validate on the subset
    evaluator = load_trainer(ckpt)
    loader = split_loader(evaluator, lmdbs["val"], batch_size=8)
    try:
        assert sorted(_sids(loader)) == list(range(N_VAL))
    finally:
        close_lmdb(loader)
