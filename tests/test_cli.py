"""End to end through the unmodified fairchem CLI: train a few steps, then predict."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import yaml
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from fairchem.core.datasets import LmdbDataset
from fairchem.core.preprocessing import AtomsToGraphs

from conftest import cli_env, fairchem_cli

pytestmark = pytest.mark.slow


def emt_frames(n: int, seed: int):
    """Rattled Cu/Pt slabs with *O or *CO, labelled by ASE's EMT (a real calculator)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        metal = ["Cu", "Pt"][k % 2]
        slab = (fcc111 if k % 3 else fcc100)(metal, size=(2, 2, 3), vacuum=6.0)
        add_adsorbate(slab, molecule(["O", "CO"][k % 2]) if k % 2 else "O", 1.8, "ontop")
        slab.set_tags([2 if a.symbol in "CO" else 1 for a in slab])
        slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 1 and a.position[2] < 7.0]))
        slab.rattle(0.1, seed=int(rng.integers(1 << 30)))
        slab.pbc = True
        slab.calc = EMT()
        slab.get_potential_energy()
        frames.append(slab)
    return frames


def write_lmdb(frames, path: Path):
    path.mkdir(parents=True)
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False, r_distances=False)
    env = lmdb.open(str(path / "data.lmdb"), map_size=1 << 30, subdir=False, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for i, atoms in enumerate(frames):
            d = a2g.convert(atoms)
            d.sid, d.fid = i, 0
            txn.put(f"{i}".encode("ascii"), pickle.dumps(d, protocol=-1))
        txn.put(b"length", pickle.dumps(len(frames), protocol=-1))
    env.sync()
    env.close()


def test_train_then_predict_with_fairchem_cli(tmp_path):
    write_lmdb(emt_frames(12, seed=0), tmp_path / "train")
    write_lmdb(emt_frames(4, seed=1), tmp_path / "val")
    assert len(LmdbDataset({"src": str(tmp_path / "train")})) == 12

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/s2ef/200k/leignn.yml").read_text())
    cfg["dataset"] = {
        "train": {"format": "lmdb", "src": str(tmp_path / "train"),
                  "transforms": {"normalizer": {"energy": {"mean": 0.0, "stdev": 1.0},
                                                "forces": {"mean": 0.0, "stdev": 1.0}}}},
        "val": {"src": str(tmp_path / "val")},
        "test": {"src": str(tmp_path / "val")},
    }
    cfg["logger"] = "tensorboard"
    cfg["model"].update(hidden_channels=16, num_layers=2, num_rbf=8)
    cfg["optim"].update(batch_size=4, eval_batch_size=4, num_workers=0, max_epochs=2, eval_every=3)
    cfg_path = tmp_path / "leignn_tiny.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    run_dir = tmp_path / "run"
    train = subprocess.run(
        [fairchem_cli(), "--mode", "train", "--config-yml", str(cfg_path), "--cpu",
         "--run-dir", str(run_dir), "--identifier", "e2e"],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
    log = train.stdout + train.stderr
    assert "Loaded LEIGNN with" in log
    ckpts = sorted(run_dir.glob("checkpoints/*/checkpoint.pt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert ckpt["step"] == 6  # 2 epochs x 3 batches of 4
    assert ckpt["config"]["model"]["name"] == "leignn_ocp.LEIGNN"
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())

    pred = subprocess.run(
        [fairchem_cli(), "--mode", "predict", "--config-yml", str(cfg_path), "--cpu",
         "--checkpoint", str(ckpts[0]), "--run-dir", str(run_dir), "--identifier", "e2e-predict"],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-5000:]
    npz = sorted(run_dir.glob("results/*/s2ef_predictions.npz"))
    assert len(npz) == 1
    res = np.load(npz[0], allow_pickle=True)
    assert res["energy"].shape == (4,) and np.isfinite(res["energy"]).all()
    n_atoms = sum(len(a) for a in emt_frames(4, seed=1))
    forces = np.concatenate(list(res["forces"])) if res["forces"].dtype == object else res["forces"]
    assert forces.reshape(-1, 3).shape[0] <= n_atoms and np.isfinite(forces.astype(float)).all()
