"""The dataset readers (leignn_ocp.data.readers): small files written in the real formats (MD17 and
rMD17 .npz, ISO17 ASE databases and id files, LiPS extxyz and MDSim's LMDBs) are converted to fairchem
LMDB folders with the right units and splits, bad files stop with errors naming the file and frame,
and each format's output trains one step through the unmodified fairchem CLI with its config."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import ase.db
import ase.io
import lmdb
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator
from fairchem.core.datasets import LmdbDataset
from torch_geometric.data import Data

from conftest import REPO, cli_env, fairchem_cli
from leignn_ocp import lineup
from leignn_ocp.data import readers
from leignn_ocp.data.readers import KCAL_MOL, ReaderError

TINY = [f"--model.{k}={v}" for k, v in lineup.get("leignn").tiny.items()]


# ------------------------------------------------------------------------------------- source files

def ethanol_frames(n: int, seed: int):
    """Rattled ethanol labelled by ASE's EMT (H, C, O): (z [9], R [n, 9, 3] A, E [n] eV, F [n, 9, 3] eV/A)."""
    rng = np.random.default_rng(seed)
    base = molecule("CH3CH2OH")
    pos, energy, forces = [], [], []
    for _ in range(n):
        a = base.copy()
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        pos.append(a.positions.copy())
        energy.append(a.get_potential_energy())
        forces.append(a.get_forces())
    return base.numbers.copy(), np.array(pos), np.array(energy), np.array(forces)


def write_md17(path: Path, z, R, E, F) -> None:
    """sGDML's MD17 layout: z uint8 [N], R [n, N, 3] A, E [n, 1] kcal/mol, F kcal/mol/A, plus metadata."""
    np.savez(path, z=z.astype(np.uint8), R=R, E=(E / KCAL_MOL)[:, None], F=F / KCAL_MOL,
             name=np.array("ethanol"), theory=np.array("EMT"), type=np.array("d"), md5=np.array("0" * 32))


def write_rmd17(path: Path, z, R, E, F) -> None:
    """rMD17's layout: nuclear_charges int64 [N], coords, energies [n] kcal/mol, forces, old_*."""
    np.savez(path, nuclear_charges=z.astype(np.int64), coords=R, energies=E / KCAL_MOL, forces=F / KCAL_MOL,
             old_indices=np.arange(len(E)) * 7, old_energies=E / KCAL_MOL + 1.0, old_forces=F / KCAL_MOL)


@pytest.fixture(scope="module")
def md17(tmp_path_factory):
    root = tmp_path_factory.mktemp("md17")
    z, R, E, F = ethanol_frames(30, seed=0)
    write_md17(root / "md17_ethanol.npz", z, R, E, F)
    (root / "rmd17" / "npz_data").mkdir(parents=True)
    (root / "rmd17" / "splits").mkdir()
    write_rmd17(root / "rmd17" / "npz_data" / "rmd17_ethanol.npz", z, R, E, F)
    perm = np.random.default_rng(5).permutation(30)
    for k in range(1, 6):  # one index per line, as rMD17's index_{train,test}_0k.csv
        (root / "rmd17" / "splits" / f"index_train_0{k}.csv").write_text("".join(f"{i}\n" for i in perm[:8]))
        (root / "rmd17" / "splits" / f"index_test_0{k}.csv").write_text("".join(f"{i}\n" for i in perm[8:12]))
    return {"root": root, "z": z, "R": R, "E": E, "F": F, "perm": perm}


def records(folder: Path) -> list[Data]:
    """The records as fairchem's LmdbDataset reads them (its handle closed again: one per file and process)."""
    ds = LmdbDataset({"src": str(folder)})
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.__del__()


def test_md17_npz_in_ev_with_a_seeded_950_50_split(md17, tmp_path):
    out = tmp_path / "out"
    assert readers.main(["md17", "--src", str(md17["root"] / "md17_ethanol.npz"), "--out", str(out),
                         "--train-size", "20", "--val-size", "4", "--seed", "3"]) == 0
    info = json.loads((out / "info.json").read_text())
    sids = {s: info["splits"][s]["sid"] for s in ("train", "val", "test")}
    assert [len(sids[s]) for s in sids] == [20, 4, 6]
    assert sorted(sum(sids.values(), [])) == list(range(30))  # a partition, every frame once
    assert sids == {k: v.tolist() for k, v in readers.random_split(30, 20, 4, None, 3, "x").items()}
    val = records(out / "val")
    for d in val:
        i = int(d.sid)
        assert isinstance(d.energy, float) and d.energy == pytest.approx(md17["E"][i], abs=1e-9)  # eV
        np.testing.assert_allclose(d.forces.numpy(), md17["F"][i], rtol=1e-6, atol=1e-6)  # eV/A
        np.testing.assert_allclose(d.pos.numpy(), md17["R"][i], atol=1e-6)
        assert d.atomic_numbers.tolist() == md17["z"].tolist() and d.pbc.tolist() == [[False] * 3]
    assert np.load(out / "val" / "metadata.npz")["natoms"].tolist() == [9] * 4
    # the default is the usual 950 / 50, which 30 frames cannot give: refused before anything is written
    with pytest.raises(ReaderError, match=r"md17_ethanol.npz: 30 frames cannot give 950 train \+ 50 val"):
        readers.convert_md17(md17["root"] / "md17_ethanol.npz", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_rmd17_matches_md17_and_uses_the_shipped_split(md17, tmp_path):
    src = md17["root"] / "rmd17" / "npz_data" / "rmd17_ethanol.npz"
    readers.convert_md17(src, tmp_path / "r", flavor="rmd17", n_train=20, n_val=4, seed=3, log=lambda *_: None)
    readers.convert_md17(md17["root"] / "md17_ethanol.npz", tmp_path / "m", n_train=20, n_val=4, seed=3,
                         log=lambda *_: None)
    # one set of frames in two layouts: byte-identical LMDBs
    for split in ("train", "val", "test"):
        r, m = (tmp_path / k / split / "data.lmdb" for k in ("r", "m"))
        assert r.read_bytes() == m.read_bytes()

    counts = readers.convert_md17(src, tmp_path / "s", flavor="rmd17", split="rmd17", split_index=2, n_val=2,
                                  log=lambda *_: None)
    assert counts == {"train": 6, "val": 2, "test": 4}
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    perm = md17["perm"]
    assert sorted(info["splits"]["train"]["sid"] + info["splits"]["val"]["sid"]) == sorted(perm[:8].tolist())
    assert info["splits"]["test"]["sid"] == sorted(perm[8:12].tolist())
    assert info["split_files"][0].endswith("splits/index_train_02.csv")
    assert info["energy_offset_eV"] == 0.0


def test_energy_offset_keeps_float32_batches_fine(md17, tmp_path):
    # fairchem batches energies as float32: -17,600 eV (aspirin) would step by 2 meV; E - offset does not
    src = md17["root"] / "md17_ethanol.npz"
    assert readers.main(["md17", "--src", str(src), "--out", str(tmp_path / "o"), "--train-size", "20",
                         "--val-size", "4", "--energy-offset", "train-mean"]) == 0
    info = json.loads((tmp_path / "o" / "info.json").read_text())
    offset = info["energy_offset_eV"]
    assert offset == round(float(md17["E"][info["splits"]["train"]["sid"]].mean()), 3) and offset != 0
    for d in records(tmp_path / "o" / "val"):
        assert d.energy == pytest.approx(md17["E"][int(d.sid)] - offset, abs=1e-9)
    with pytest.raises(ReaderError, match=r"energy offset 'mean': none, train-mean or a number \(eV\)"):
        readers.convert_md17(src, tmp_path / "p", n_train=20, n_val=4, energy_offset="mean")


def test_md17_errors_name_the_file_and_the_frame(md17, tmp_path):
    root = md17["root"]
    with pytest.raises(ReaderError, match=r"rmd17_ethanol.npz: not an MD17 file: missing \['z', 'R', 'E', 'F'\].*"
                                          r"convert it with `rmd17`"):
        readers.read_md17(root / "rmd17" / "npz_data" / "rmd17_ethanol.npz", "md17")
    z, R, E, F = md17["z"], md17["R"].copy(), md17["E"], md17["F"].copy()
    F[7, 4, 1] = np.nan
    write_md17(tmp_path / "nan.npz", z, R, E, F)
    with pytest.raises(ReaderError, match=r"nan.npz frame 7: forces of atom 4 are not finite"):
        readers.convert_md17(tmp_path / "nan.npz", tmp_path / "o", n_train=20, n_val=4)
    assert not (tmp_path / "o").exists()  # nothing half-written
    write_md17(tmp_path / "short.npz", z, R, E, F[:, :8])
    with pytest.raises(ReaderError, match=r"short.npz: 'F' has shape \(30, 8, 3\), expected \(30, 9, 3\)"):
        readers.read_md17(tmp_path / "short.npz")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "index_train_01.csv").write_text("1\n2\n31\n")
    (tmp_path / "splits" / "index_test_01.csv").write_text("3\n")
    write_rmd17(tmp_path / "r.npz", z, md17["R"], E, md17["F"])
    with pytest.raises(ReaderError, match=r"index_train_01.csv line 3: frame index 31 is out of range \(0..29\)"):
        readers.convert_md17(tmp_path / "r.npz", tmp_path / "o", flavor="rmd17", split="rmd17", n_val=1)
    (tmp_path / "splits" / "index_train_01.csv").write_text("1\n2\n3\n")
    with pytest.raises(ReaderError, match=r"r.npz: 1 frames are in both train and test \(first: index 3\)|"
                                          r"r.npz: 1 frames are in both val and test \(first: index 3\)"):
        readers.convert_md17(tmp_path / "r.npz", tmp_path / "o", flavor="rmd17", split="rmd17", n_val=1)
    # an existing output is kept unless --force
    (tmp_path / "keep").mkdir()
    assert readers.main(["md17", "--src", str(root / "md17_ethanol.npz"), "--out", str(tmp_path / "keep"),
                         "--train-size", "20", "--val-size", "4"]) == 2
    assert list((tmp_path / "keep").iterdir()) == []


# ------------------------------------------------------------------------------------------- ISO17

def write_iso17(root: Path, n_ref: int = 12, n_within: int = 3, n_other: int = 3) -> dict:
    """ISO17's files: three ASE databases (total_energy as a key-value pair in reference.db and
    test_within.db, in row.data in test_other.db; atomic_forces in row.data) and 1-based id files."""
    root.mkdir()
    labels = {}
    for name, n, seed, in_data in (("reference", n_ref, 1, False), ("test_within", n_within, 2, False),
                                   ("test_other", n_other, 3, True)):
        z, R, E, F = ethanol_frames(n, seed)
        labels[name] = (R, E, F)
        with ase.db.connect(root / f"{name}.db") as db:
            for i in range(n):
                a = molecule("CH3CH2OH")
                a.positions = R[i]
                data = {"atomic_forces": F[i]}
                if in_data:
                    db.write(a, data=dict(data, total_energy=E[i]))
                else:
                    db.write(a, total_energy=float(E[i]), data=data)
    (root / "train_ids.txt").write_text("".join(f"{i}\n" for i in (1, 2, 4, 5, 7, 9, 10, 12)))
    (root / "validation_ids.txt").write_text("3\n8\n11\n")
    return labels


def test_iso17_ase_databases(tmp_path):
    labels = write_iso17(tmp_path / "iso17")
    counts = readers.convert_iso17(tmp_path / "iso17", tmp_path / "out", log=lambda *_: None)
    assert counts == {"train": 8, "val": 3, "test_within": 3, "test_other": 3}
    val = records(tmp_path / "out" / "val")
    assert [int(d.sid) for d in val] == [3, 8, 11]  # row ids, in the order of validation_ids.txt
    R, E, F = labels["reference"]
    for d in val:
        i = int(d.sid) - 1  # 1-based row id
        assert d.energy == pytest.approx(E[i], abs=1e-9)
        np.testing.assert_allclose(d.forces.numpy(), F[i], rtol=1e-6, atol=1e-6)
    R, E, F = labels["test_other"]  # energy read from row.data
    assert [d.energy for d in records(tmp_path / "out" / "test_other")] == pytest.approx(E.tolist(), abs=1e-9)

    (tmp_path / "iso17" / "validation_ids.txt").write_text("3\n13\n")
    with pytest.raises(ReaderError, match=r"validation_ids.txt: row id 13 is not in .*reference.db"):
        readers.convert_iso17(tmp_path / "iso17", tmp_path / "o")
    (tmp_path / "iso17" / "validation_ids.txt").write_text("3\n4\n")
    with pytest.raises(ReaderError,
                       match=r"1 frames are in both train_ids.txt and validation_ids.txt \(first: index 4\)"):
        readers.convert_iso17(tmp_path / "iso17", tmp_path / "o")
    (tmp_path / "iso17" / "validation_ids.txt").write_text("3\n")
    with ase.db.connect(tmp_path / "iso17" / "test_within.db") as db:
        db.write(molecule("H2O"), total_energy=1.0)
    with pytest.raises(ReaderError, match=r"test_within.db row id 4: no 'atomic_forces' in row.data"):
        readers.convert_iso17(tmp_path / "iso17", tmp_path / "o")
    (tmp_path / "iso17" / "test_other.db").unlink()
    with pytest.raises(ReaderError, match=r"iso17: missing \['test_other.db'\]"):
        readers.convert_iso17(tmp_path / "iso17", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- LiPS

def lips_frames(n: int, seed: int = 0):
    """Periodic Li/P/S boxes (24 atoms) labelled by a Lennard-Jones calculator, as extxyz frames."""
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=4.2, cubic=True).repeat((2, 3, 1))  # 24 sites, 8.4 x 12.6 x 4.2 A
    base.set_chemical_symbols(["Li"] * 14 + ["P"] * 3 + ["S"] * 7)
    out = []
    for _ in range(n):
        a = base.copy()
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        a.calc = LennardJones(sigma=2.6, epsilon=0.01, rc=5.0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        out.append(a)
    return out


def write_mdsim_lmdbs(frames, splits: dict, root: Path) -> None:
    """The LMDBs MDSim's preprocessing/lips.py writes: PyG Data with y [1] / force float32, long natoms
    [1], float fixed, sid 0, fid = frame index, and a 'length' of the last index (one short)."""
    for split, idx in splits.items():
        (root / split).mkdir(parents=True)
        env = lmdb.open(str(root / split / "data.lmdb"), subdir=False, map_size=1 << 30)
        for i, fi in enumerate(idx):
            a = frames[fi]
            d = Data(cell=torch.tensor(np.asarray(a.cell), dtype=torch.float32)[None],
                     pos=torch.tensor(a.positions, dtype=torch.float32),
                     atomic_numbers=torch.tensor(a.numbers, dtype=torch.long),
                     natoms=torch.tensor([len(a)], dtype=torch.long),
                     y=torch.tensor([a.get_potential_energy()], dtype=torch.float32),
                     force=torch.tensor(a.get_forces(), dtype=torch.float32),
                     fixed=torch.zeros(len(a)))
            d.sid, d.fid = 0, int(fi)
            with env.begin(write=True) as txn:
                txn.put(f"{i}".encode("ascii"), pickle.dumps(d, protocol=-1))
        with env.begin(write=True) as txn:
            txn.put(b"length", pickle.dumps(i, protocol=-1))
        env.close()


def test_mdsim_split_is_sklearn_train_test_split():
    # scikit-learn's ShuffleSplit: RandomState(seed).permutation, test part first; MDSim splits twice
    n = 40
    perm = np.random.RandomState(123).permutation(n)
    both, test = perm[8:], perm[:8]  # train_test_split(arange(40), train_size=32, test_size=8)
    perm2 = np.random.RandomState(123).permutation(32)
    s = readers.mdsim_split(n, 28, 4)
    assert s["train"].tolist() == both[perm2[4:]].tolist() and s["val"].tolist() == both[perm2[:4]].tolist()
    assert s["test"].tolist() == sorted(test.tolist())
    assert readers.MDSIM_LIPS_SIZES == (19000, 1000)


@pytest.fixture(scope="module")
def lips(tmp_path_factory):
    root = tmp_path_factory.mktemp("lips")
    frames = lips_frames(14)
    ase.io.write(root / "lips.xyz", frames, format="extxyz")
    return root, frames


def test_lips_trajectory_and_mdsim_lmdbs_give_the_same_records(lips, tmp_path):
    root, frames = lips
    counts = readers.convert_lips(root / "lips.xyz", tmp_path / "xyz", n_train=8, n_val=2, log=lambda *_: None)
    assert counts == {"train": 8, "val": 2, "test": 4}
    split = readers.mdsim_split(14, 8, 2)
    write_mdsim_lmdbs(frames, split, root / "mdsim" / "lips" / "20k")
    logs = []
    readers.convert_lips(root / "mdsim" / "lips", tmp_path / "lmdb", log=logs.append)
    assert any("'length' says 7 but 8 records are there" in m for m in logs)  # MDSim's off-by-one, all kept
    for name in ("train", "val", "test"):
        a, b = records(tmp_path / "xyz" / name), records(tmp_path / "lmdb" / name)
        assert [int(d.sid) for d in a] == [int(d.sid) for d in b] == list(split[name])
        for da, db in zip(a, b):
            frame = frames[int(da.sid)]
            assert da.pbc.all() and db.pbc.all() and torch.equal(da.cell, db.cell)
            torch.testing.assert_close(da.pos, db.pos, rtol=0, atol=2e-6)  # MDSim stored float32 positions
            np.testing.assert_allclose(da.cell.numpy()[0], np.asarray(frame.cell), atol=1e-6)  # cell kept
            assert da.energy == pytest.approx(frame.get_potential_energy(), abs=1e-9)
            assert db.energy == pytest.approx(da.energy, rel=1e-6)  # MDSim stored float32
            torch.testing.assert_close(da.forces, db.forces)

    bad = [a.copy() for a in frames[:3]]
    for a, f in zip(bad, frames[:3]):
        a.calc = SinglePointCalculator(a, energy=f.get_potential_energy(), forces=f.get_forces())
    bad[2].calc = None
    ase.io.write(tmp_path / "nolabels.xyz", bad, format="extxyz")
    with pytest.raises(ReaderError, match=r"nolabels.xyz frame 2: no energy"):
        readers.convert_lips(tmp_path / "nolabels.xyz", tmp_path / "o", n_train=1, n_val=1)
    with pytest.raises(ReaderError, match=r"several MDSim size folders \(\['lmdb', 'xyz'\]\); pass one as --src"):
        readers.convert_lips(tmp_path, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match=r"empty: neither MDSim's train/val/test LMDB folders nor lips.xyz inside"):
        readers.convert_lips(tmp_path / "empty", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ fairchem CLI, one step

def train_one_step(config: str, data: Path, run_dir: Path) -> dict:
    """`fairchem --mode train` with the format's config as it is, tiny model, one step of batch 4."""
    cmd = [fairchem_cli(), "--mode", "train", "--config-yml", config, "--cpu", "--run-dir", str(run_dir),
           "--identifier", "r", "--timestamp-id", "r", f"--dataset.train.src={data / 'train'}",
           f"--dataset.val.src={data / 'val'}", "--optim.max_epochs=1", "--optim.batch_size=4",
           "--optim.eval_batch_size=4", "--optim.checkpoint_every=-1", *TINY]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "r" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    return ckpt


@pytest.mark.slow
def test_each_format_trains_one_step_with_its_config(md17, lips, tmp_path):
    # rMD17's shipped split (8 train indices here): 4 val, 4 train -> one step of batch 4
    readers.convert_md17(md17["root"] / "rmd17" / "npz_data" / "rmd17_ethanol.npz", tmp_path / "md17",
                         flavor="rmd17", split="rmd17", n_val=4, log=lambda *_: None)
    write_iso17(tmp_path / "iso17_src", n_ref=6, n_within=1, n_other=1)
    (tmp_path / "iso17_src" / "train_ids.txt").write_text("1\n2\n4\n5\n")
    (tmp_path / "iso17_src" / "validation_ids.txt").write_text("3\n6\n")
    readers.convert_iso17(tmp_path / "iso17_src", tmp_path / "iso17", log=lambda *_: None)
    readers.convert_lips(lips[0] / "lips.xyz", tmp_path / "lips", n_train=4, n_val=2, log=lambda *_: None)
    for key in ("md17", "iso17", "lips"):
        ckpt = train_one_step(f"configs/{key}/leignn.yml", tmp_path / key, tmp_path / f"run_{key}")
        assert ckpt["config"]["model"]["use_pbc"] is (key == "lips")
