"""Bring your own data: an ASE database and extxyz files of EMT-labelled slabs train the line-up
through the unmodified fairchem CLI with the README's overrides, and a checkpoint is scored on them
(leignn_ocp.evaluation.byo); bad files stop with errors that name the problem."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import REPO, cli_env, emt_slab_frames, fairchem_cli
from leignn_ocp import lineup
from leignn_ocp.evaluation import byo

N_TRAIN, N_VAL = 8, 4
TINY = [f"--model.{k}={v}" for k, v in lineup.get("leignn").tiny.items()]
SHORT = ["--optim.max_epochs=1", "--optim.batch_size=4", "--optim.eval_batch_size=4",
         "--optim.checkpoint_every=-1"]


def readme_overrides(fmt: str, train: Path, val: Path) -> list[str]:
    """The dataset overrides of README "Your own data" (docs/notes/byo_data.md), verbatim."""
    args = [f"--dataset.train.format={fmt}", f"--dataset.train.src={train}"]
    if fmt == "ase_read_multi":
        args.append("--dataset.train.pattern=*.extxyz")
    return args + ["--dataset.train.a2g_args.r_energy=True", "--dataset.train.a2g_args.r_forces=True",
                   f"--dataset.val.src={val}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The same EMT frames as ASE databases and as extxyz folders (bottom layer FixAtoms, tags 1/2)."""
    root = tmp_path_factory.mktemp("byo")
    frames = {"train": emt_slab_frames(N_TRAIN, seed=0), "val": emt_slab_frames(N_VAL, seed=1)}
    out = {}
    for split, atoms in frames.items():
        with ase.db.connect(root / f"{split}.db") as db:
            for a in atoms:
                db.write(a)
        (root / f"xyz_{split}").mkdir()
        ase.io.write(root / f"xyz_{split}" / "frames.extxyz", atoms)
        out[f"{split}.db"], out[f"xyz_{split}"] = root / f"{split}.db", root / f"xyz_{split}"
    no_forces = [a.copy() for a in frames["val"]]
    for a, labelled in zip(no_forces, frames["val"]):
        a.calc = SinglePointCalculator(a, energy=labelled.get_potential_energy())
    with ase.db.connect(root / "no_forces.db") as db:
        for a in no_forces:
            db.write(a)
    out["no_forces.db"], out["root"], out["frames"] = root / "no_forces.db", root, frames
    return out


def train(cmd_tail: list[str], run_dir: Path) -> Path:
    cmd = [fairchem_cli(), "--mode", "train", "--config-yml", "configs/s2ef/default/leignn.yml", "--cpu",
           "--run-dir", str(run_dir), "--identifier", "byo", "--timestamp-id", "byo", *cmd_tail, *TINY, *SHORT]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return run_dir / "checkpoints" / "byo"


@pytest.mark.slow
def test_train_on_ase_db_and_extxyz_then_score(data, tmp_path, capsys):
    db_run = train(readme_overrides("ase_db", data["train.db"], data["val.db"]), tmp_path / "db")
    xyz_run = train(readme_overrides("ase_read_multi", data["xyz_train"], data["xyz_val"]), tmp_path / "xyz")
    for run in (db_run, xyz_run):
        ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert ckpt["step"] == N_TRAIN // 4  # one epoch of the 8 training structures, batch 4
        assert ckpt["config"]["dataset"]["format"] in ("ase_db", "ase_read_multi")
    # the normalizer of default/base.yml was fitted at run time on the labels both readers gave
    norms = [torch.load(run / "normalizers.pt", map_location="cpu", weights_only=False) for run in (db_run, xyz_run)]
    energies = np.array([a.get_potential_energy() for a in data["frames"]["train"]])
    for norm in norms:
        assert float(norm["energy"].mean) == pytest.approx(energies.mean(), rel=1e-6)
    assert float(norms[0]["forces"].rmsd) == pytest.approx(float(norms[1]["forces"].rmsd), rel=1e-6)

    # the README's scoring command, in this process (`python -m leignn_ocp.evaluation.byo ARGS`)
    out = tmp_path / "scores"
    assert byo.main([str(db_run), "--split", f"db={data['val.db']}", "--split",
                     f"xyz={data['xyz_val'] / 'frames.extxyz'}", "--cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "byo_scores.json").read_text())["results"]
    assert res["db"]["n_structures"] == res["xyz"]["n_structures"] == N_VAL
    # one set of frames, two file formats: the same scores (forces of FixAtoms atoms are not scored)
    for key in ("energy_mae_meV", "forces_mae_meV_per_A", "forces_cos"):
        assert np.isfinite(res["db"][key]) and res["db"][key] == pytest.approx(res["xyz"][key], rel=1e-5)
    assert f"| db | {data['val.db']} | {N_VAL} |" in printed and "| xyz |" in printed


def readme_config(key: str, fmt: str, data: dict) -> dict:
    """The config `fairchem --mode train` builds from a default leaf and the README's overrides."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config

    src = {"ase_db": (data["train.db"], data["val.db"]), "ase_read_multi": (data["xyz_train"], data["xyz_val"])}[fmt]
    argv = ["--mode", "train", "--config-yml", str(lineup.config_path(key)), "--cpu", *readme_overrides(fmt, *src)]
    return build_config(*flags.get_parser().parse_known_args(argv))


def train_dataset(config: dict):
    return byo.open_dataset({k: v for k, v in config["dataset"]["train"].items() if k != "transforms"})


def test_extxyz_and_ase_db_give_the_same_training_records(data, monkeypatch):
    """Both readers, as the README configures them: labels, FixAtoms as `fixed`, tags 1/2 kept."""
    monkeypatch.chdir(REPO)
    db, xyz = (train_dataset(readme_config("leignn", fmt, data)) for fmt in ("ase_db", "ase_read_multi"))
    assert len(db) == len(xyz) == N_TRAIN
    for i, atoms in enumerate(data["frames"]["train"]):
        a, b = db[i], xyz[i]
        assert a.energy == pytest.approx(atoms.get_potential_energy()) and b.energy == pytest.approx(a.energy)
        free = a.fixed == 0
        assert a.fixed.sum().item() == len(atoms.constraints[0].index) and torch.equal(a.fixed, b.fixed)
        assert a.tags.tolist() == b.tags.tolist() == list(atoms.get_tags())
        torch.testing.assert_close(a.pos, b.pos)
        torch.testing.assert_close(a.forces[free], b.forces[free])  # extxyz stores fixed atoms' forces as 0


def test_every_lineup_model_takes_a_training_step_on_the_readme_config(data, monkeypatch):
    """Every line-up model with a default leaf, tiny, on a batch of the README's ase_db dataset:
    finite energies [B], forces [N, 3], loss on free atoms and gradients."""
    from fairchem.core.datasets import data_list_collater

    monkeypatch.chdir(REPO)
    entries = [e for e in lineup.ENTRIES if (REPO / "configs/s2ef/default" / f"{e.key}.yml").is_file()]
    assert {"leignn", "schnet", "painn", "gemnet_dt"} <= {e.key for e in entries}
    for e in entries:
        config = readme_config(e.key, "ase_db", data)
        batch = data_list_collater([train_dataset(config)[i] for i in range(4)], otf_graph=True)
        torch.manual_seed(0)
        model = lineup.build_model(config["model"], e.tiny)
        with torch.enable_grad():
            out = model(batch)
            loss = out["energy"].abs().sum() + out["forces"][batch.fixed == 0].abs().sum()
            loss.backward()
        assert out["energy"].reshape(-1).shape == (4,) and out["forces"].shape == batch.pos.shape, e.key
        assert torch.isfinite(loss), e.key
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), e.key


def test_missing_database_and_missing_forces_are_named(data):
    from fairchem.core.datasets import AseDBDataset
    from ase.calculators.calculator import PropertyNotImplementedError

    missing = data["root"] / "nope.db"
    # what `fairchem --mode train` raises for --dataset.train.src=nope.db (the same constructor)
    with pytest.raises(ValueError, match=r"No valid ase data found!.*" + str(missing)):
        AseDBDataset({"src": str(missing), "a2g_args": {"r_energy": True, "r_forces": True}})
    # and for a db without forces, at its first batch: the property, but not the file
    ds = AseDBDataset({"src": str(data["no_forces.db"]), "a2g_args": {"r_energy": True, "r_forces": True}})
    with pytest.raises(PropertyNotImplementedError, match='The property "forces" is not available'):
        ds[0]
    # the check names the file, the structure and what it has
    with pytest.raises(ValueError, match=r"no_forces\.db: structure 0 \(0\) has no forces \(it has energy\)"):
        byo.check(byo.dataset_config(data["no_forces.db"]))
    with pytest.raises(FileNotFoundError, match=r"nope\.db: no such file or folder"):
        byo.dataset_config(missing)
    with pytest.raises(SystemExit, match=r"--split expects NAME=PATH"):
        byo.main(["ckpt", "--split", str(data["val.db"])])
    summary = byo.check(byo.dataset_config(data["xyz_val"]))  # a folder of extxyz files -> ase_read_multi
    frames = data["frames"]["val"]
    assert summary["structures"] == N_VAL and summary["atoms"] == sum(len(a) for a in frames)
    assert summary["fixed_atoms"] == sum(len(a.constraints[0].index) for a in frames) and summary["tags"] == [1, 2]
