"""Bad datasets stop with an error naming the file and the structure, before training (issue 16):
truncated / corrupt LMDBs, a ``length`` key that disagrees, missing labels, NaN / inf, ASE databases
without labels, mixed dtypes; through validate_lmdb, validate_dataset_config and ``leignn-oc20-data
check``. Every bad file is built for real."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import ase.db
import ase.io
import lmdb
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Data

from leignn_ocp.data import oc20
from leignn_ocp.data.lmdb_io import (
    DatasetValidationError,
    LmdbValidationError,
    _write_values,
    dumps_deterministic,
    iter_raw_lmdb_dir,
    validate_lmdb,
    write_lmdb_dir,
    write_metadata_npz,
)
from leignn_ocp.data.validate import validate_ase_db, validate_dataset_config, validate_source

REPO = Path(__file__).resolve().parents[1]
N = 4  # atoms per structure


def record(i: int = 0, n: int = N, **over) -> Data:
    """A valid S2EF record as fairchem's AtomsToGraphs writes it (float32 pos, float atomic numbers),
    with fields replaced (``None`` removes one)."""
    g = torch.Generator().manual_seed(i)
    fields = dict(pos=torch.rand(n, 3, generator=g) * 5, atomic_numbers=torch.full((n,), 29.0), natoms=n,
                  cell=(torch.eye(3) * 5).view(1, 3, 3), tags=torch.ones(n, dtype=torch.long),
                  fixed=torch.zeros(n), energy=float(-i), forces=torch.rand(n, 3, generator=g) - 0.5, sid=i)
    fields.update(over)
    return Data(**{k: v for k, v in fields.items() if v is not None})


def records(count: int, bad: dict[int, dict] | None = None, n: int = N) -> list[Data]:
    bad = bad or {}
    return [record(i, n, **bad.get(i, {})) for i in range(count)]


def raw_lmdb(path: Path, items: dict[bytes, bytes]) -> Path:
    """An LMDB file holding exactly ``items`` (for keys and lengths fairchem's writers never make)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()
    return path


# ----------------------------------------------------------------------------- 1. truncated / corrupt


def test_truncated_lmdb_is_refused_before_any_read(tmp_path):
    src = write_lmdb_dir(tmp_path / "full", records(64, n=20))
    size = (src / "data.lmdb").stat().st_size
    half = tmp_path / "half"
    half.mkdir()
    (half / "data.lmdb").write_bytes((src / "data.lmdb").read_bytes()[: size // 2])
    msg = rf"{half / 'data.lmdb'} is truncated: {size // 2} bytes, but its LMDB header says {size} .*SIGBUS"
    # fairchem's LmdbDataset dies with SIGBUS on this file (no Python error); these raise instead
    with pytest.raises(LmdbValidationError, match=msg):
        validate_lmdb(half, max_check=0)
    with pytest.raises(LmdbValidationError, match=msg):
        list(iter_raw_lmdb_dir(half))  # the split tool reads through this
    assert validate_lmdb(src, max_check=None) == 64


def test_random_bytes_and_a_corrupt_record(tmp_path):
    (tmp_path / "rand").mkdir()
    (tmp_path / "rand" / "data.lmdb").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    with pytest.raises(LmdbValidationError, match=rf"cannot open {tmp_path / 'rand' / 'data.lmdb'} as an LMDB "
                                                  r"file \(.*\); corrupt or not LMDB"):
        validate_lmdb(tmp_path / "rand")
    # pages past the header overwritten with random bytes (same size: the truncation check passes)
    src = write_lmdb_dir(tmp_path / "pages", records(64, n=20))
    blob = bytearray((src / "data.lmdb").read_bytes())
    blob[len(blob) // 2:] = np.random.default_rng(5).bytes(len(blob) - len(blob) // 2)
    (src / "data.lmdb").write_bytes(bytes(blob))
    with pytest.raises(LmdbValidationError, match=r"pages/data.lmdb: corrupt LMDB \(CorruptedError: .*MDB_CORRUPTED"):
        validate_lmdb(src, max_check=0)
    # an intact file whose record 7 was overwritten (same size, so the header still matches)
    src = write_lmdb_dir(tmp_path / "rec", records(12))
    blob = bytearray((src / "data.lmdb").read_bytes())
    value = dumps_deterministic(records(12)[7])
    at = bytes(blob).find(value)
    assert at > 0 and bytes(blob).count(value) == 1
    blob[at:at + 8] = b"\xff" * 8
    (src / "data.lmdb").write_bytes(bytes(blob))
    with pytest.raises(LmdbValidationError, match=r"data.lmdb: record 7 cannot be unpickled \(UnpicklingError"):
        validate_lmdb(src, max_check=None)


# ----------------------------------------------------------------------------- 2. length key


@pytest.mark.parametrize("length, n_records, match", [
    (5, 4, r"'length' key says 5 records but the file holds 4 \(fairchem's LmdbDataset reads keys 0..4: "
           r"it would crash on a missing key\)"),
    (3, 4, r"'length' key says 3 records but the file holds 4 \(.*: 1 records would be silently skipped\)"),
])
def test_length_key_that_disagrees_with_the_records(tmp_path, length, n_records, match):
    items = {str(i).encode(): dumps_deterministic(record(i)) for i in range(n_records)}
    db = raw_lmdb(tmp_path / "d" / "data.lmdb", {**items, b"length": pickle.dumps(length)})
    with pytest.raises(LmdbValidationError, match=rf"{db}: {match}"):
        validate_lmdb(db.parent, max_check=0)  # a header-only check already sees it


def test_keys_that_are_not_0_to_n_minus_1(tmp_path):
    recs = {k: dumps_deterministic(record(i)) for i, k in enumerate((b"0", b"1", b"3"))}
    db = raw_lmdb(tmp_path / "gap" / "data.lmdb", {**recs, b"length": pickle.dumps(3)})
    with pytest.raises(LmdbValidationError, match=r"key 2 missing: the 3 records are not under keys 0..2 \(.*crash at index 2"):
        validate_lmdb(db, max_check=0)
    # no length key: fairchem counts the entries, so keys 0 and 2 mean "records 0..1"
    db = raw_lmdb(tmp_path / "nolen" / "data.lmdb", {b"0": recs[b"0"], b"2": recs[b"1"]})
    with pytest.raises(LmdbValidationError, match=r"key 1 missing: the 2 records are not under keys 0..1"):
        validate_lmdb(db)
    db = raw_lmdb(tmp_path / "badlen" / "data.lmdb", {b"0": recs[b"0"], b"length": b"\x00junk"})
    with pytest.raises(LmdbValidationError, match=r"unreadable 'length' entry"):
        validate_lmdb(db)


# ----------------------------------------------------------------------------- 3. missing labels


def test_some_frames_without_forces(tmp_path):
    # record 277 has no forces: past the first 256 records (what the check used to read)
    src = write_lmdb_dir(tmp_path / "d", records(300, {277: dict(forces=None)}))
    with pytest.raises(LmdbValidationError, match=r"data.lmdb: record 277 label 'forces' \(or 'force'\) is missing"):
        validate_lmdb(src, max_check=None)
    assert validate_lmdb(src, required=("energy",), max_check=None) == 300
    # the default sample is spread over the file, so a bad last record is found too
    src = write_lmdb_dir(tmp_path / "last", records(300, {299: dict(energy=None)}))
    with pytest.raises(LmdbValidationError, match=r"record 299 label 'energy' \(or 'y'\) is missing"):
        validate_lmdb(src)
    # OC20's raw names (y / force) on some records, fairchem's on the others: both read
    mixed = records(6, {i: dict(energy=None, forces=None, y=1.0, force=torch.zeros(N, 3)) for i in (1, 4)})
    assert validate_lmdb(write_lmdb_dir(tmp_path / "mixed", mixed), max_check=None) == 6


def test_several_files_name_the_file_and_the_dataset_index(tmp_path):
    folder = tmp_path / "multi"
    folder.mkdir()
    _write_values(folder / "data.0000.lmdb", (dumps_deterministic(d) for d in records(5)))
    _write_values(folder / "data.0001.lmdb", (dumps_deterministic(d) for d in records(5, {3: dict(forces=None)})))
    with pytest.raises(LmdbValidationError, match=r"data.0001.lmdb: record 3 \(dataset index 8\) label 'forces'"):
        validate_lmdb(folder, max_check=None)


# ----------------------------------------------------------------------------- 4. NaN / inf


@pytest.mark.parametrize("bad, match", [
    (dict(energy=float("nan")), r"record 3 label 'energy' is not one finite number \(nan\)"),
    (dict(energy=None, y=float("-inf")), r"record 3 label 'energy' \(or 'y'\) is not one finite number \(-inf\)"),
    (dict(energy=torch.tensor([float("inf")])), r"record 3 label 'energy' is not one finite number"),
    (dict(forces=torch.tensor([[0.0, 0, 0], [float("inf"), 0, 0], [0, 0, 0], [0, 0, 0]])),
     r"record 3 label 'forces' is non-finite values \(atom 1: \[inf, 0.0, 0.0\]\)"),
    (dict(forces=torch.full((N, 3), float("nan"))), r"record 3 label 'forces' is non-finite values \(atom 0"),
    (dict(pos=torch.full((N, 3), float("nan"))), r"record 3 'pos' is non-finite values \(atom 0"),
])
def test_nan_and_inf(tmp_path, bad, match):
    src = write_lmdb_dir(tmp_path / "d", records(5, {3: bad}))
    with pytest.raises(LmdbValidationError, match=match):
        validate_lmdb(src, max_check=None)


# ----------------------------------------------------------------------------- 6. mixed dtypes


@pytest.mark.parametrize("bad, match", [
    (dict(pos=torch.rand(N, 3, dtype=torch.float64)),
     r"record 4 'pos' is torch.float64 but .*data.lmdb: record 0 has torch.float32 \(mixed dtypes"),
    (dict(forces=torch.zeros(N, 3, dtype=torch.long)),
     r"record 4 label 'forces' is of dtype torch.int64, expected floating point"),
    (dict(atomic_numbers=torch.tensor([29.0, 6.5, 29.0, 29.0])),
     r"record 4 'atomic_numbers' is not whole numbers \(atom 1: 6.5; fairchem's .long\(\) would truncate it\)"),
    (dict(atomic_numbers=torch.tensor([29, 29, 0, 29])), r"record 4 'atomic_numbers' is out of range \(atom 2: 0"),
    (dict(atomic_numbers=torch.full((N,), 29, dtype=torch.long)),
     r"record 4 'atomic_numbers' is torch.int64 but .*record 0 has torch.float32"),
    (dict(pos=np.zeros((N, 3), dtype=np.float32)), r"record 4 'pos' is a numpy.ndarray, not a torch.Tensor"),
    (dict(forces=torch.zeros(N - 1, 3)), r"record 4 label 'forces' is shape \(3, 3\), expected \[natoms=4, 3\]"),
    (dict(natoms=2.0), r"record 4 'natoms' is not one positive integer \(2.0\)"),
])
def test_mixed_and_wrong_dtypes(tmp_path, bad, match):
    src = write_lmdb_dir(tmp_path / "d", records(6, {4: bad}))
    with pytest.raises(LmdbValidationError, match=match):
        validate_lmdb(src, max_check=None)


class PyG1Record:
    """Pickles as OC20's LMDB records do (a Data of PyG 1.x: attributes in ``__dict__``, no ``_store``),
    which PyG 2 cannot index until fairchem's pyg2_data_transform converts it."""

    def __init__(self, **fields):
        self.fields = fields

    def __reduce_ex__(self, protocol):
        return object.__new__, (Data,), self.fields


def test_record_that_is_not_a_data_and_pyg1_records(tmp_path):
    db = raw_lmdb(tmp_path / "dict" / "data.lmdb", {b"0": pickle.dumps({"pos": [0.0]}), b"length": pickle.dumps(1)})
    with pytest.raises(LmdbValidationError, match=r"record 0 is a builtins.dict, not a torch_geometric Data"):
        validate_lmdb(db)
    old = {k: v for k, v in record(0).to_dict().items() if k not in ("energy", "forces")}
    items = {b"0": pickle.dumps(PyG1Record(**old, y=-1.0, force=torch.zeros(N, 3))),
             b"1": pickle.dumps(PyG1Record(**old, y=-1.0)), b"length": pickle.dumps(2)}
    with pytest.raises(RuntimeError, match="older version of PyG"):
        pickle.loads(items[b"0"])["pos"]
    db = raw_lmdb(tmp_path / "pyg1" / "data.lmdb", items)
    assert validate_lmdb(db, max_check=1) == 2
    with pytest.raises(LmdbValidationError, match=r"record 1 label 'forces' \(or 'force'\) is missing"):
        validate_lmdb(db, max_check=None)


def test_stale_metadata_npz(tmp_path):
    src = write_lmdb_dir(tmp_path / "d", records(5))
    write_metadata_npz(src / "metadata.npz", [N] * 4)
    with pytest.raises(LmdbValidationError, match=r"metadata.npz: natoms has 4 entries but the LMDB files hold 5"):
        validate_lmdb(src)
    write_metadata_npz(src / "metadata.npz", [N, N, 7, N, N])
    with pytest.raises(LmdbValidationError, match=r"metadata.npz: natoms\[2\] = 7 but .*record 2 has 4 atoms"):
        validate_lmdb(src, max_check=None)


# ----------------------------------------------------------------------------- 5. ASE databases


def atoms(i: int, energy: float | None = 0.0, forces: np.ndarray | None = None, label: bool = True) -> Atoms:
    a = Atoms("Cu4", positions=np.random.default_rng(i).random((4, 3)) * 4, cell=[5, 5, 5], pbc=True)
    if label:
        a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((4, 3)) if forces is None else forces)
    return a


def ase_db_file(path: Path, frames: list[Atoms]) -> Path:
    with ase.db.connect(path) as db:
        for a in frames:
            db.write(a)
    return path


def test_ase_db_rows_without_labels(tmp_path):
    good = ase_db_file(tmp_path / "good.db", [atoms(i) for i in range(5)])
    assert validate_ase_db(good) == 5
    no_f = [atoms(i) for i in range(5)]
    no_f[3].calc = SinglePointCalculator(no_f[3], energy=-1.0)
    db = ase_db_file(tmp_path / "no_forces.db", no_f)
    with pytest.raises(DatasetValidationError, match=rf"{db}: row id 4 \(dataset index 3\) has no forces \(it has energy;"):
        validate_ase_db(db)
    assert validate_ase_db(db, required=("energy",)) == 5
    no_e = [atoms(i) for i in range(5)]
    no_e[1].calc = SinglePointCalculator(no_e[1], forces=np.zeros((4, 3)))
    no_e[2].calc = None
    db = ase_db_file(tmp_path / "no_energy.db", no_e)
    with pytest.raises(DatasetValidationError, match=r"row id 2 \(dataset index 1\) has no energy \(it has forces;"):
        validate_ase_db(db)
    with pytest.raises(DatasetValidationError, match=r"row id 3 \(dataset index 2\) has no forces \(it has no labels;"):
        validate_ase_db(db, required=("forces",))


def test_ase_db_nan_labels_and_bad_files(tmp_path):
    # SQLite stores a NaN energy as NULL: it reads back as no energy
    db = ase_db_file(tmp_path / "nan.db", [atoms(0), atoms(1, energy=float("nan"))])
    with pytest.raises(DatasetValidationError, match=r"row id 2 \(dataset index 1\) has no energy"):
        validate_ase_db(db)
    f = np.zeros((4, 3))
    f[2, 1] = np.inf
    db = ase_db_file(tmp_path / "inf.json", [atoms(0), atoms(1, forces=f)])
    with pytest.raises(DatasetValidationError, match=r"inf.json: row id 2 \(dataset index 1\) has non-finite "
                                                     r"forces \(atom 2: \[0.0, inf, 0.0\]\)"):
        validate_ase_db(db)
    db = ase_db_file(tmp_path / "nane.json", [atoms(0, energy=float("nan"))])
    with pytest.raises(DatasetValidationError, match=r"row id 1 \(dataset index 0\) has a non-finite energy \(nan\)"):
        validate_ase_db(db)
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(DatasetValidationError, match=r"empty.db: empty file"):
        validate_ase_db(tmp_path / "empty.db")
    assert (tmp_path / "empty.db").stat().st_size == 0  # checking never writes (ASE would add its tables)
    (tmp_path / "rand.db").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DatasetValidationError, match=r"rand.db: not an SQLite file"):
        validate_ase_db(tmp_path / "rand.db")
    with pytest.raises(DatasetValidationError, match=r"does not exist"):
        validate_ase_db(tmp_path / "missing.db")


def test_ase_db_folder_names_the_file_and_what_fairchem_would_skip(tmp_path):
    folder = tmp_path / "dbs"
    folder.mkdir()
    ase_db_file(folder / "a.db", [atoms(i) for i in range(3)])
    b = [atoms(i) for i in range(3)]
    b[1].calc = SinglePointCalculator(b[1], energy=0.0)
    ase_db_file(folder / "b.db", b)
    with pytest.raises(DatasetValidationError, match=r"b.db: row id 2 \(dataset index 4\) has no forces"):
        validate_ase_db(folder)
    (folder / "b.db").unlink()
    (folder / "notes.txt").write_text("not a database")
    with pytest.raises(DatasetValidationError, match=r"notes.txt: cannot open as an ASE database .*skip it silently"):
        validate_ase_db(folder)


# ----------------------------------------------------------------------------- the dataset config


def test_validate_dataset_config_merges_splits_like_fairchem(tmp_path):
    train = write_lmdb_dir(tmp_path / "train", records(6))
    val = write_lmdb_dir(tmp_path / "val", records(3, {2: dict(energy=None, y=float("nan"))}))
    test = write_lmdb_dir(tmp_path / "test", records(2, {0: dict(energy=None, forces=None)}))  # unlabelled
    mapping = {"y": "energy", "force": "forces"}
    cfg = {"train": {"format": "lmdb", "src": str(train), "key_mapping": mapping}, "val": {"src": str(val)},
           "test": {"src": str(test)}}
    # val inherits the train key_mapping (fairchem's use_train_settings), so its 'y' is the energy
    with pytest.raises(DatasetValidationError, match=rf"^dataset.val \(lmdb\): {val / 'data.lmdb'}: record 2 "
                                                     r"label 'energy' \(or 'y'\) is not one finite number"):
        validate_dataset_config(cfg)
    cfg["val"] = {"src": str(train)}
    assert validate_dataset_config(cfg) == {"train": 6, "val": 6, "test": 2}
    # no key_mapping: fairchem does not rename y, so a record with only y has no energy
    y_only = write_lmdb_dir(tmp_path / "y", records(2, {1: dict(energy=None, y=1.0)}))
    with pytest.raises(DatasetValidationError, match=r"dataset.train \(lmdb\): .*record 1 label 'energy' is missing"):
        validate_dataset_config({"train": {"src": str(y_only)}})
    # a val without labels is an error, a test without labels is not; a split without src is not built
    with pytest.raises(DatasetValidationError, match=r"dataset.val \(lmdb\): .*record 0 label 'energy'"):
        validate_dataset_config({"train": {"src": str(train)}, "val": {"src": str(test)}, "test": {}})


def test_validate_dataset_config_ase_db(tmp_path):
    lmdb_train = write_lmdb_dir(tmp_path / "train", records(4))
    b = [atoms(i) for i in range(4)]
    b[2].calc = SinglePointCalculator(b[2], energy=0.0)
    db = ase_db_file(tmp_path / "val.db", b)
    a2g = {"r_energy": True, "r_forces": True}
    cfg = {"train": {"format": "ase_db", "src": str(db), "a2g_args": a2g}}
    with pytest.raises(DatasetValidationError, match=rf"^dataset.train \(ase_db\): {db}: row id 3 \(dataset index 2\) "
                                                     "has no forces"):
        validate_dataset_config(cfg)
    cfg["train"]["a2g_args"] = {"r_energy": True}
    with pytest.raises(DatasetValidationError, match=r"dataset.train \(ase_db, .*val.db\): a2g_args.r_forces not "
                                                     r"True, so fairchem reads no forces from it"):
        validate_dataset_config(cfg)
    # an LMDB train set and an ASE validation set that does not use the train settings
    good = ase_db_file(tmp_path / "good.db", [atoms(i) for i in range(3)])
    mixed = {"train": {"format": "lmdb", "src": str(lmdb_train)},
             "val": {"format": "ase_db", "src": str(good), "a2g_args": a2g, "use_train_settings": False}}
    assert validate_dataset_config(mixed) == {"train": 4, "val": 3}


def test_embedded_default_data_passes_and_counts_match_fairchem():
    from fairchem.core.common.utils import load_config
    from fairchem.core.datasets import LmdbDataset

    if not (REPO / "data" / "default" / "s2ef" / "train" / "data.lmdb").is_file():
        pytest.skip("no embedded data (bash scripts/run_main.sh generates it)")
    cfg = load_config(str(REPO / "configs" / "s2ef" / "default" / "leignn.yml"))[0]["dataset"]
    cfg = {k: {**v, "src": str(REPO / v["src"])} for k, v in cfg.items()}
    counts = validate_dataset_config(cfg, max_check=64)
    assert set(counts) == {"train", "val"}
    for split, n in counts.items():
        assert n == len(LmdbDataset({"src": cfg[split]["src"]}))


# ----------------------------------------------------------------------------- the CLI


def test_check_command_on_lmdb_ase_db_and_config(tmp_path, capsys, monkeypatch):
    train = write_lmdb_dir(tmp_path / "train", records(5))
    good = ase_db_file(tmp_path / "good.db", [atoms(i) for i in range(3)])
    assert oc20.main(["check", str(train), str(good), "--full"]) == 0
    out = capsys.readouterr().out
    assert f"ok  {train}: 5 structures" in out and f"ok  {good}: 3 structures" in out
    assert validate_source(good) == 3 and validate_source(train, "lmdb") == 5

    bad = ase_db_file(tmp_path / "bad.db", [atoms(0), atoms(1, label=False)])
    half = tmp_path / "half"
    half.mkdir()
    (half / "data.lmdb").write_bytes((train / "data.lmdb").read_bytes()[:8192 + 100])
    assert oc20.main(["check", str(bad), str(half), str(train)]) == 1
    err = capsys.readouterr().err
    assert f"BAD {bad}: row id 2 (dataset index 1) has no energy and no forces" in err
    assert f"BAD {half / 'data.lmdb'} is truncated" in err

    monkeypatch.chdir(tmp_path)  # a config with relative paths, as fairchem reads them from the cwd
    (tmp_path / "run.yml").write_text(yaml.safe_dump({"dataset": {
        "train": {"format": "lmdb", "src": "train"}, "val": {"src": "bad.db", "format": "ase_db",
                                                           "a2g_args": {"r_energy": True, "r_forces": True}}}}))
    assert oc20.main(["check", "--config-yml", "run.yml"]) == 1
    assert "BAD run.yml: dataset.val (ase_db): bad.db: row id 2 (dataset index 1) has no energy" in capsys.readouterr().err
    (tmp_path / "ok.yml").write_text(yaml.safe_dump({"dataset": {"train": {"src": "train"}}}))
    assert oc20.main(["check", "--config-yml", "ok.yml", "--sample", "2"]) == 0
    assert "ok  ok.yml: train 5 structures" in capsys.readouterr().out
    assert oc20.main(["check"]) == 2


def test_check_command_on_extxyz(tmp_path, capsys):
    frames = [atoms(i) for i in range(3)]
    frames[2].calc = SinglePointCalculator(frames[2], energy=-2.0)
    ase.io.write(tmp_path / "frames.extxyz", frames)
    assert oc20.main(["check", "--format", "ase_read_multi", str(tmp_path / "frames.extxyz")]) == 1
    assert (f"BAD {tmp_path}: structure 2 ({tmp_path / 'frames.extxyz'} 2) has no forces (it has energy"
            in capsys.readouterr().err)
    assert validate_source(tmp_path / "frames.extxyz", "ase_read_multi", required=("energy",)) == 3
