"""The offline OC20-style S2EF generator, LMDB validation and the 8:2 / 25 % split tool."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from leignn_ocp.data import LmdbValidationError, oc20, validate_lmdb, write_lmdb_dir
from leignn_ocp.data.cli import generate_main
from leignn_ocp.data.generate import SPLITS, GenConfig, check_splits, existing_matches, generate, partition
from leignn_ocp.data.lmdb_io import atomic_dir
from leignn_ocp.data.splits import split_indices, split_lmdb

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# tiny but complete: 5 splits, one facet, short relaxations, 1 IS2RS system
TINY = dict(seed=0, train_systems=4, val_systems=1, frames_per_system=4, rattled_per_system=1,
            pressed_per_system=2, max_steps=12, millers=((1, 0, 0),), is2rs_systems=1, is2rs_max_steps=80)
TINY_ARGS = ["--seed", "0", "--train-systems", "4", "--val-systems", "1", "--frames-per-system", "4",
             "--rattled-per-system", "1", "--pressed-per-system", "2", "--max-steps", "12", "--millers", "100", "--is2rs-systems", "1",
             "--is2rs-max-steps", "80"]


CALLER_STATE: dict = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny dataset, made in this process (one worker) from a caller state that is not the
    generator's (2 torch threads, an extra warning filter); CALLER_STATE records it before/after."""
    out = tmp_path_factory.mktemp("gen") / "default"
    n0 = torch.get_num_threads()
    with warnings.catch_warnings():
        torch.set_num_threads(2)
        warnings.filterwarnings("error", message="leignn caller filter")
        before = (torch.get_num_threads(), list(warnings.filters))
        try:
            generate(GenConfig(**TINY), out, workers=1, progress=False)
            CALLER_STATE.update(before=before, after=(torch.get_num_threads(), list(warnings.filters)))
        finally:
            torch.set_num_threads(n0)
    return out


def _files(root: Path) -> dict[str, bytes]:
    """The data files (not summary.json, which records timings and kernels, nor the PNG)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name not in ("summary.json", "forces.png")}


N_FILES = 2 * (len(SPLITS) + 1)  # data.lmdb + metadata.npz of each split and of is2rs/


def test_generated_splits_load_with_fairchem_lmdbdataset(tiny):
    from fairchem.core.datasets import LmdbDataset

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    for split in SPLITS:
        path = tiny / "s2ef" / split
        assert sorted(p.name for p in path.iterdir()) == ["data.lmdb", "metadata.npz"]
        n = validate_lmdb(path, max_check=None)  # before LmdbDataset: one LMDB handle per process
        ds = LmdbDataset({"src": str(path)})
        assert len(ds) == n == summary["splits"][split]["frames"] > 0
        meta = np.load(path / "metadata.npz")["natoms"]
        assert meta.dtype == np.int32 and len(meta) == len(ds)
        for i in range(len(ds)):
            d = ds[i]
            n = int(d.natoms)
            assert meta[i] == n
            assert d.pos.shape == (n, 3) and d.pos.dtype == torch.float32
            assert d.forces.shape == (n, 3) and torch.isfinite(d.forces).all()
            assert d.cell.shape == (1, 3, 3)
            # written by fairchem's AtomsToGraphs, which wraps positions into the cell
            frac = d.pos.double() @ torch.linalg.inv(d.cell[0].double())  # [N, 3]
            assert ((frac > -1e-5) & (frac < 1 + 1e-5)).all()
            assert d.atomic_numbers.shape == (n,)
            # the record dtypes of every dataset this generator has written (format 1 and 2)
            assert d.atomic_numbers.dtype == d.fixed.dtype == torch.float32 and d.tags.dtype == torch.long
            assert set(d.tags.tolist()) == {0, 1, 2}  # subsurface, surface, adsorbate
            # OC20: the fixed atoms are exactly the subsurface ones
            assert torch.equal(d.fixed.bool(), d.tags == 0)
            assert set(d.atomic_numbers[d.tags == 2].long().tolist()) <= {1, 6, 7, 8}
            assert set(d.atomic_numbers[d.tags != 2].long().tolist()) <= {13, 28, 29, 46, 47, 78, 79}
            assert isinstance(d.energy, float) and np.isfinite(d.energy)
            assert isinstance(d.sid, int) and isinstance(d.fid, int)
        assert ds.metadata_hasattr("natoms")


@pytest.mark.filterwarnings("ignore:edge_index information not found")
def test_metadata_is_what_fairchem_make_lmdb_sizes_writes(tiny, tmp_path):
    from fairchem.core.scripts.make_lmdb_sizes import make_lmdb_sizes

    copy = tmp_path / "val_id"
    shutil.copytree(tiny / "s2ef" / "val_id", copy)
    ours = np.load(copy / "metadata.npz")
    (copy / "metadata.npz").unlink()
    make_lmdb_sizes(Namespace(data_path=str(copy), num_workers=1))
    theirs = np.load(copy / "metadata.npz")
    assert set(ours.files) == set(theirs.files) == {"natoms"}
    assert ours["natoms"].dtype == theirs["natoms"].dtype
    np.testing.assert_array_equal(ours["natoms"], theirs["natoms"])


def test_labels_are_the_calculator_on_the_stored_structures(tiny):
    """Forces are EMT's on the stored positions; energies are EMT's up to one per-system reference."""
    from ase import Atoms
    from ase.calculators.emt import EMT
    from fairchem.core.datasets import LmdbDataset

    ds = LmdbDataset({"src": str(tiny / "s2ef" / "train")})
    by_sid: dict[int, list] = {}
    for i in range(len(ds)):
        by_sid.setdefault(ds[i].sid, []).append(ds[i])
    sid, frames = next((s, f) for s, f in by_sid.items() if len(f) >= 2)
    emt = []
    for d in frames[:2]:
        atoms = Atoms(numbers=d.atomic_numbers.long().numpy(), positions=d.pos.double().numpy(),
                      cell=d.cell[0].double().numpy(), pbc=True)
        atoms.calc = EMT()
        emt.append(atoms.get_potential_energy())
        np.testing.assert_allclose(atoms.get_forces(), d.forces.numpy(), atol=2e-3)
    # adsorption referencing subtracts the same slab + gas reference within one system
    assert abs((emt[0] - emt[1]) - (frames[0].energy - frames[1].energy)) < 2e-3
    # and the reference is large: these are not total energies
    assert abs(emt[0] - frames[0].energy) > 1.0


def test_splits_are_disjoint_in_the_oc20_sense(tiny):
    from fairchem.core.datasets import LmdbDataset

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    ads, cat = summary["partition"]["adsorbates"], summary["partition"]["catalysts"]
    assert not set(ads["seen"]) & set(ads["unseen"]) and not set(cat["seen"]) & set(cat["unseen"])
    pools = {"train": ("seen", "seen"), "val_id": ("seen", "seen"), "val_ood_ads": ("unseen", "seen"),
             "val_ood_cat": ("seen", "unseen"), "val_ood_both": ("unseen", "unseen")}
    sids = {}
    for split, (ap, cp) in pools.items():
        sp = summary["splits"][split]
        assert set(sp["adsorbates"]) <= set(ads[ap]), split
        assert set(sp["catalysts"]) <= set(cat[cp]), split
        ds = LmdbDataset({"src": str(tiny / "s2ef" / split)})
        sids[split] = {ds[i].sid for i in range(len(ds))}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not sids[a] & sids[b], (a, b)
    # ID validation: seen adsorbates and catalysts but new (catalyst, facet, adsorbate) systems
    assert summary["splits"]["val_id"]["systems"] >= 1


def test_split_checker_rejects_leaks():
    part = {"ads": {"seen": [1, 2], "unseen": [3]}, "cat": {"seen": ["Cu"], "unseen": ["Pt"]}}

    def o(split, cat, ads, sid, miller=(1, 1, 1)):
        return {"candidate": {"split": split, "catalyst": cat, "adsorbate_id": ads, "sid": sid, "miller": miller}}

    ok = {s: [] for s in SPLITS}
    ok["train"] = [o("train", "Cu", 1, 0)]
    ok["val_id"] = [o("val_id", "Cu", 2, 1)]
    ok["val_ood_both"] = [o("val_ood_both", "Pt", 3, 2)]
    check_splits(ok, part)
    with pytest.raises(AssertionError):  # unseen adsorbate in val_id
        check_splits({**ok, "val_id": [o("val_id", "Cu", 3, 1)]}, part)
    with pytest.raises(AssertionError):  # unseen catalyst in val_ood_ads
        check_splits({**ok, "val_ood_ads": [o("val_ood_ads", "Pt", 3, 5)]}, part)
    with pytest.raises(AssertionError):  # the same system in train and val_id
        check_splits({**ok, "val_id": [o("val_id", "Cu", 1, 1)]}, part)


def test_partition_is_seeded_and_covers_everything():
    from leignn_ocp.data.catalysts import adsorbate_ids, default_catalysts

    cats, ads = default_catalysts(), adsorbate_ids()
    assert len(ads) >= 80  # OC20's adsorbates are all H/C/N/O
    p0, p0b, p1 = (partition(GenConfig(seed=s), cats, ads) for s in (0, 0, 1))
    assert p0 == p0b and p0 != p1
    assert sorted(p0["ads"]["seen"] + p0["ads"]["unseen"]) == ads
    assert sorted(p0["cat"]["seen"] + p0["cat"]["unseen"]) == sorted(c.name for c in cats)
    # both elemental metals and alloys are held out for OOD-cat
    assert any(len(c) <= 2 for c in p0["cat"]["unseen"]) and any(len(c) > 2 for c in p0["cat"]["unseen"])


def test_small_adsorbate_share_draws_that_share_of_candidates_from_the_small_adsorbates():
    """small_adsorbate_share of a split's candidates come from its pool's adsorbates of at most
    is2rs_max_adsorbate_atoms atoms (OOD-Ads from the unseen ones)."""
    from leignn_ocp.data.catalysts import adsorbate_db, adsorbate_ids, default_catalysts
    from leignn_ocp.data.generate import candidates

    cats, ads = default_catalysts(), adsorbate_ids()
    natoms = lambda c: len(adsorbate_db()[c["adsorbate_id"]][0])  # noqa: E731
    for share in (0.0, 0.3, 1.0):
        cfg = GenConfig(small_adsorbate_share=share)
        part = partition(cfg, cats, ads)
        # (catalyst, facet, adsorbate) never repeats: the unseen pool holds 2 small adsorbates
        for split, pool, n, tol in (("train", "seen", 300, 0.09), ("val_ood_ads", "unseen", 60, 0.15)):
            cands = candidates(cfg, part, split, 0, n, set())
            assert all(c["adsorbate_id"] in part["ads"][pool] for c in cands)
            drawn = [c for c in cands if c["small"]]
            assert all(natoms(c) <= cfg.is2rs_max_adsorbate_atoms for c in drawn)
            assert abs(len(drawn) / len(cands) - share) < tol, (split, share, len(drawn))
            if share == 0.0:  # some small ones still come from the uniform draw
                assert 0 < sum(natoms(c) <= 2 for c in cands) < 0.3 * len(cands)
    with pytest.raises(ValueError, match="small_adsorbate_share must be in \\[0, 1\\], got 1.5"):
        GenConfig(small_adsorbate_share=1.5)


def test_same_seed_gives_byte_identical_data_and_other_seed_differs(tiny, tmp_path):
    again = tmp_path / "again"
    generate(GenConfig(**TINY), again, workers=2, progress=False)  # other worker count, same bytes
    a, b = _files(tiny), _files(again)
    assert a.keys() == b.keys() and len(a) == N_FILES
    for k in a:
        assert a[k] == b[k], f"{k} differs between two runs with the same seed"
    other = tmp_path / "other"
    generate(GenConfig(**{**TINY, "seed": 1}), other, workers=2, progress=False)
    c = _files(other)
    assert c["s2ef/train/data.lmdb"] != a["s2ef/train/data.lmdb"]


def test_one_worker_generate_leaves_caller_threads_and_warning_filters(tiny):
    before, after = CALLER_STATE["before"], CALLER_STATE["after"]
    assert before[0] == 2 and any(f[1] is not None and f[1].pattern == "leignn caller filter" for f in before[1])
    assert after[0] == before[0], "generate() changed torch's thread count"
    assert after[1] == before[1], "generate() changed the warning filters"


def test_labelling_runs_single_threaded_and_quiet_then_restores():
    from leignn_ocp.data.generate import _one_thread_quiet

    try:
        import threadpoolctl
    except ImportError:
        pytest.fail("threadpoolctl is not installed: generate() cannot hold numpy's BLAS at one thread")
    blas = lambda: [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    n0 = torch.get_num_threads()
    with warnings.catch_warnings():
        torch.set_num_threads(2)
        with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
            outside = blas()
            filters = list(warnings.filters)
            with _one_thread_quiet():
                assert torch.get_num_threads() == 1
                assert blas() and set(blas()) == {1}
                with warnings.catch_warnings(record=True) as caught:
                    warnings.warn("pymatgen chatter")
                assert caught == []  # a filter ignores it before the recorder sees it
            assert torch.get_num_threads() == 2 and blas() == outside and warnings.filters == filters
        torch.set_num_threads(n0)


def test_cli_skips_existing_matching_data(tiny, capsys):
    lmdb_file = tiny / "s2ef" / "train" / "data.lmdb"
    before = lmdb_file.stat().st_mtime_ns
    assert existing_matches(tiny, GenConfig(**TINY))
    assert not existing_matches(tiny, GenConfig(**{**TINY, "seed": 5}))
    assert generate_main(["--out", str(tiny), *TINY_ARGS]) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    assert lmdb_file.stat().st_mtime_ns == before


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path), "--millers", "1x1"])
    assert generate_main(["--out", str(tmp_path), "--train-systems", "0"]) == 2
    assert not (tmp_path / "s2ef").exists()


def _command(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"console script {name} not found next to {sys.executable} (pip install -e .)")
    return str(exe)


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


# what another machine would select: OpenBLAS's oldest x86 kernels, glibc's libm without FMA/AVX2,
# two threads (this machine's own choice, AVX2 Zen/Haswell kernels, is the other run)
OTHER_MACHINE = {"OPENBLAS_CORETYPE": "Prescott", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA",
                 "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}


def _generate_cli(out: Path, other_machine: bool, *extra: str) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_ENV, *OTHER_MACHINE)}
    if other_machine:
        env.update(OTHER_MACHINE)
    stdout = _run([_command("leignn-generate-data"), "--out", str(out), *TINY_ARGS, "--workers", "1",
                   "--no-progress", *extra], env=env).stdout
    return stdout, _files(out)


def test_cli_bytes_do_not_depend_on_the_machines_kernels(tmp_path):
    """`leignn-generate-data` labels in a child process with pinned kernels: under this machine's
    own kernels and under another machine's (other OpenBLAS kernel, libm variant, thread count) it
    writes the same bytes, where labelling in-process with each one's kernels (--native-kernels)
    does not. The old spelling `python scripts/generate_data.py` still runs (the fast exit)."""
    out, here = _generate_cli(tmp_path / "here", False)
    assert "wrote" in out and json.loads(out.strip().splitlines()[-1])["summary"].endswith("summary.json")
    _, there = _generate_cli(tmp_path / "there", True)
    assert here.keys() == there.keys() and len(here) == N_FILES
    for k in here:
        assert here[k] == there[k], f"{k}: the pinned generator wrote other bytes under other kernels"
    kern = json.loads((tmp_path / "there" / "s2ef" / "summary.json").read_text())["kernels"]
    assert kern["pinned"] and kern["numpy_simd_dispatch"] == []
    assert {b["architecture"] for b in kern["blas"]} == {"Prescott"} and {b["num_threads"] for b in kern["blas"]} == {1}
    _, native_here = _generate_cli(tmp_path / "native_here", False, "--native-kernels")
    _, native_there = _generate_cli(tmp_path / "native_there", True, "--native-kernels")
    differ = [k for k in native_here if native_here[k] != native_there[k]]
    assert differ, "the native kernels gave the same bytes: this check cannot tell pinning from luck here"
    kern = json.loads((tmp_path / "native_here" / "s2ef" / "summary.json").read_text())["kernels"]
    assert not kern["pinned"]
    old = _run([sys.executable, "scripts/generate_data.py", "--out", str(tmp_path / "here"), *TINY_ARGS]).stdout
    assert "already holds this dataset" in old


def test_oc20_data_commands(tiny, tmp_path, capsys):
    val = str(tiny / "s2ef" / "val_id")
    n = validate_lmdb(val, max_check=None)
    for cmd in ([_command("leignn-oc20-data")], [sys.executable, "scripts/oc20_data.py"]):
        assert f"ok  {val}: {n} structures" in _run([*cmd, "check", val]).stdout
    # in process: download --dry-run prints fairchem's own scripts and runs nothing
    assert oc20.main(["download", "--split", "val_id", "--data-path", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "download_data.py --task s2ef --split val_id" in out and "--ref-energy" in out
    assert f"make_lmdb_sizes.py --data-path {tmp_path.resolve() / 's2ef' / 'all' / 'val_id'}" in out
    assert not any(tmp_path.iterdir())
    # check exits 1 naming the bad folder
    assert oc20.main(["check", val, str(tmp_path / "missing")]) == 1
    assert "BAD LMDB path does not exist" in capsys.readouterr().err


def test_oc20_download_test_split_lands_where_predict_reads(tmp_path, capsys, monkeypatch):
    """`download --split test`: fairchem's own script and URL, into <data-path>/s2ef/all/test_*,
    the folders `leignn-evaluate predict --split-prefix test_ --data-root <data-path>/s2ef/all` reads."""
    from fairchem.core.scripts.download_data import DOWNLOAD_LINKS_s2ef

    targets = [tmp_path / "s2ef" / "all" / f"test_{s}" for s in ("id", "ood_ads", "ood_cat", "ood_both")]
    assert oc20.main(["download", "--split", "test", "--data-path", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    url = DOWNLOAD_LINKS_s2ef["s2ef"]["test"]
    assert url.endswith("s2ef_test_lmdbs.tar.gz") and url in out
    line = next(ln for ln in out.splitlines() if "download_data.py" in ln)
    assert line.split()[1:3] == [sys.executable, str(Path(oc20._fairchem_script("download_data.py")))]
    assert "--task s2ef --split test" in line and "--ref-energy" not in line  # no preprocessing for test
    for t in targets:
        assert str(t.resolve()) in out and f"make_lmdb_sizes.py --data-path {t.resolve()}" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing

    # a real run, fairchem's script stood in for: it only `mv`s test_* into s2ef/all when that exists
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        dest = tmp_path / "s2ef" / "all"
        if "download_data.py" in cmd[1] and dest.is_dir() and moves:
            for t in targets:
                t.mkdir()
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(oc20.subprocess, "run", fake_run)
    moves = False  # fairchem's mv found nothing (wget/tar failed): a clear error, not a silent success
    assert oc20.main(["download", "--split", "test", "--data-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert all(str(t) in err for t in targets) and "missing" in err
    moves = True
    assert oc20.main(["download", "--split", "test", "--data-path", str(tmp_path)]) == 0
    assert all(t.is_dir() for t in targets)
    assert [Path(c[1]).name for c in calls[-5:]] == ["download_data.py"] + ["make_lmdb_sizes.py"] * 4
    # all four there: no second download; only some: refused (mv would nest or fail)
    calls.clear()
    assert oc20.main(["download", "--split", "test", "--data-path", str(tmp_path)]) == 0
    assert [Path(c[1]).name for c in calls] == ["make_lmdb_sizes.py"] * 4
    targets[2].rmdir()
    assert oc20.main(["download", "--split", "test", "--data-path", str(tmp_path)]) == 2
    assert "not all four test splits" in capsys.readouterr().err


def test_paper_split_tool_is_deterministic_and_disjoint(tiny, tmp_path):
    from fairchem.core.datasets import LmdbDataset

    from leignn_ocp.data.lmdb_io import iter_raw_lmdb_dir

    src = tiny / "s2ef" / "train"
    n = validate_lmdb(src)
    gc.collect()  # LmdbDatasets of earlier tests hold the files open (one handle per process)
    src_records = [raw for _, raw in iter_raw_lmdb_dir(src)]
    counts = split_lmdb(src, tmp_path / "a", seed=0)
    assert counts == {"train": n - round(0.2 * n), "val": round(0.2 * n)}
    tr = [raw for _, raw in iter_raw_lmdb_dir(tmp_path / "a" / "train")]
    va = [raw for _, raw in iter_raw_lmdb_dir(tmp_path / "a" / "val")]
    assert not set(tr) & set(va) and sorted(tr + va) == sorted(src_records)
    assert len(LmdbDataset({"src": str(tmp_path / "a" / "val")})) == counts["val"]
    meta = np.load(tmp_path / "a" / "val" / "metadata.npz")["natoms"]
    assert list(meta) == [pickle.loads(r).natoms for r in va]

    split_lmdb(src, tmp_path / "b", seed=0)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    split_lmdb(src, tmp_path / "c", seed=1)
    assert _files(tmp_path / "a") != _files(tmp_path / "c")

    # the 50K-of-200K protocol: a 25 % subset, then 8:2
    sub = split_lmdb(src, tmp_path / "s", seed=0, subset_frac=0.25)
    assert sum(sub.values()) == round(0.25 * n)
    with pytest.raises(FileExistsError):
        split_lmdb(src, tmp_path / "a", seed=0)


def test_split_indices_protocol():
    tr, va = split_indices(200_000, (0.8, 0.2), seed=0)
    assert (len(tr), len(va)) == (160_000, 40_000) and not np.intersect1d(tr, va).size
    tr50, va50 = split_indices(200_000, (0.8, 0.2), seed=0, subset_frac=0.25)
    assert (len(tr50), len(va50)) == (40_000, 10_000)
    assert np.array_equal(split_indices(1000, (0.8, 0.2), seed=3)[1], split_indices(1000, (0.8, 0.2), seed=3)[1])
    with pytest.raises(ValueError):
        split_indices(10, (0.7, 0.2), seed=0)


def _data(n=3, **labels):
    d = Data(pos=torch.zeros(n, 3), atomic_numbers=torch.ones(n), natoms=n, cell=torch.eye(3).view(1, 3, 3),
             tags=torch.zeros(n, dtype=torch.long), fixed=torch.zeros(n))
    for k, v in labels.items():
        d[k] = v
    return d


def test_validate_lmdb_errors_name_the_problem(tmp_path):
    with pytest.raises(LmdbValidationError, match="does not exist"):
        validate_lmdb(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmdbValidationError, match=r"no \*\.lmdb files"):
        validate_lmdb(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "data.lmdb").write_bytes(os.urandom(8192))
    with pytest.raises(LmdbValidationError, match="corrupt or not LMDB"):
        validate_lmdb(tmp_path / "corrupt")

    write_lmdb_dir(tmp_path / "noforces", [_data(energy=1.0)])
    with pytest.raises(LmdbValidationError, match="'forces'.* is missing"):
        validate_lmdb(tmp_path / "noforces")
    assert validate_lmdb(tmp_path / "noforces", required=("energy",)) == 1

    write_lmdb_dir(tmp_path / "badshape", [_data(energy=1.0, forces=torch.zeros(2, 3))])
    with pytest.raises(LmdbValidationError, match=r"'forces' is shape \(2, 3\)"):
        validate_lmdb(tmp_path / "badshape")
    write_lmdb_dir(tmp_path / "nan", [_data(energy=float("nan"), forces=torch.zeros(3, 3))])
    with pytest.raises(LmdbValidationError, match="'energy' is not one finite number"):
        validate_lmdb(tmp_path / "nan")
    # OC20's raw key names (y, force) are accepted
    write_lmdb_dir(tmp_path / "oc20keys", [_data(y=-1.0, force=torch.zeros(3, 3))])
    assert validate_lmdb(tmp_path / "oc20keys") == 1

    (tmp_path / "zero").mkdir()
    env = lmdb.open(str(tmp_path / "zero" / "data.lmdb"), subdir=False, lock=False)
    env.close()
    with pytest.raises(LmdbValidationError, match="hold no records"):
        validate_lmdb(tmp_path / "zero")

    (tmp_path / "garbage").mkdir()
    env = lmdb.open(str(tmp_path / "garbage" / "data.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", b"not a pickle")
    env.close()
    with pytest.raises(LmdbValidationError, match="record 0 cannot be unpickled"):
        validate_lmdb(tmp_path / "garbage")


def test_writes_are_atomic(tmp_path):
    final = tmp_path / "ds"
    write_lmdb_dir(final, [_data(energy=1.0, forces=torch.zeros(3, 3))])
    before = _files(final)
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "data.lmdb").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert _files(final) == before  # the old dataset is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folder left behind
    with pytest.raises(ValueError, match="empty dataset"):
        write_lmdb_dir(tmp_path / "none", [])
    assert not (tmp_path / "none").exists()


def test_bad_generator_arguments():
    from leignn_ocp.data.generate import make_calculator

    with pytest.raises(ValueError):
        GenConfig(train_systems=0)
    with pytest.raises(ValueError):
        GenConfig(millers=((0, 0, 0),))
    with pytest.raises(ValueError, match="unknown calculator"):
        make_calculator("dft-please")
    with pytest.raises(RuntimeError, match="cannot build calculator"):
        make_calculator("no_such_module:Calc")


def test_rigid_body_keeps_adsorbate_geometry_while_relaxing():
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.optimize import BFGS

    from leignn_ocp.data.rigid import RigidBody

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=8.0)
    n = len(slab)
    add_adsorbate(slab, molecule("CH3OH"), 2.0, "ontop")
    slab.set_constraint([FixAtoms(indices=range(4)), RigidBody(range(n, len(slab)), slab.positions)])
    d0 = slab[n:].get_all_distances()
    com0 = slab.positions[n:].mean(0)
    slab.calc = EMT()
    BFGS(slab, logfile=None).run(fmax=0.05, steps=40)
    np.testing.assert_allclose(slab[n:].get_all_distances(), d0, atol=1e-6)
    assert np.linalg.norm(slab.positions[n:].mean(0) - com0) > 1e-3  # it did move


def test_keep_anomalies_flags_records_instead_of_dropping(tmp_path):
    """Free (non-rigid) EMT relaxations break adsorbates; kept systems carry the OC20 anomaly flag."""
    from fairchem.core.datasets import LmdbDataset

    cfg = GenConfig(**{**TINY, "train_systems": 3, "max_steps": 40, "rigid_adsorbate": "off",
                       "keep_anomalies": True, "is2rs_systems": 0})
    summary = generate(cfg, tmp_path / "kept", workers=1, progress=False)
    flagged_systems = 0
    for split in SPLITS:
        fl = summary["filtered"][split]
        assert fl["action"].startswith("kept") and fl["candidates_tried"] == summary["splits"][split]["systems"]
        ds = LmdbDataset({"src": str(tmp_path / "kept" / "s2ef" / split)})
        flags = {}
        for i in range(len(ds)):
            assert ds[i].anomaly in (0, 1, 2, 3, 4)
            flags.setdefault(ds[i].sid, set()).add(ds[i].anomaly)
        assert all(len(v) == 1 for v in flags.values())  # one flag per system
        n_bad = sum(v != {0} for v in flags.values())
        assert n_bad == fl["anomalous"]
        flagged_systems += n_bad
    assert flagged_systems >= 1  # EMT's C/H/N/O does break adsorbates when they are free


def _records(path: Path) -> list:
    from fairchem.core.datasets import LmdbDataset

    ds = LmdbDataset({"src": str(path)})
    return [ds[i] for i in range(len(ds))]


def test_as_needed_sampling_relaxes_free_where_the_adsorbate_survives(tiny):
    """EMT's default (as_needed): systems relax free unless that breaks the adsorbate; the broken
    free relaxation's frames are kept flagged, the rest sampled rigid; summary counts = records."""
    from leignn_ocp.data.generate import ANOMALIES, BROKEN_FID

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    assert summary["config"]["rigid_adsorbate"] == "auto" and summary["sampling"].startswith("free relaxation;")
    free_systems = broken_frames = 0
    for split in SPLITS:
        sp = summary["splits"][split]
        by_sid: dict[int, list] = {}
        for d in _records(tiny / "s2ef" / split):
            assert d.rigid in (0, 1) and 0 <= d.anomaly <= len(ANOMALIES)
            # flagged frames are exactly the broken free relaxations' (fid from BROKEN_FID on)
            assert (d.anomaly > 0) == (d.fid >= BROKEN_FID) and (d.anomaly == 0 or d.rigid == 0)
            by_sid.setdefault(d.sid, []).append(d)
        rigid = {sid for sid, ds in by_sid.items() if any(d.rigid for d in ds)}
        broken = {sid for sid, ds in by_sid.items() if any(d.anomaly for d in ds)}
        assert broken == rigid, "a system is sampled rigid exactly when its free relaxation broke"
        assert len(by_sid) == sp["systems"] and len(rigid) == sp["systems_sampled_rigid"]
        assert sp["broken_frames"] == sum(d.anomaly > 0 for ds in by_sid.values() for d in ds)
        free_systems += sp["systems_sampled_free"]
        broken_frames += sp["broken_frames"]
    assert free_systems >= 1 and broken_frames >= 1  # both kinds occur on the tiny data


def test_force_distribution_and_near_minimum_share_are_what_the_records_hold(tiny):
    from leignn_ocp.data.generate import FORCE_BINS, NEAR_MIN

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    np.testing.assert_allclose(summary["force_bins_eV_per_A"], FORCE_BINS)
    for split in SPLITS:
        sp = summary["splits"][split]
        norms, fmax = [], []
        for d in _records(tiny / "s2ef" / split):
            f = d.forces[d.fixed == 0].double().norm(dim=1).numpy()  # [n_free]
            norms.append(f)
            fmax.append(f.max())
        counts = np.histogram(np.clip(np.concatenate(norms), FORCE_BINS[0], FORCE_BINS[-1]), FORCE_BINS)[0]
        assert sp["free_force_histogram"] == counts.tolist()
        assert sp["near_minimum_frames"] == int((np.array(fmax) < NEAR_MIN).sum())
        assert sp["near_minimum_share"] == pytest.approx(sp["near_minimum_frames"] / sp["frames"])
    assert (tiny / "s2ef" / "forces.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minimum_rattles_are_the_last_relaxation_frame_displaced_by_each_std(tiny):
    """After the relaxation frames (fid 0..L) and rattled_per_system random rattles come one copy of
    frame L per minimum_rattle_std (fixed atoms in place, free atoms displaced by about that std), then
    pressed_per_system pressed frames, each above the relaxation's last frame in energy."""
    from leignn_ocp.data.generate import BROKEN_FID

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    stds = summary["config"]["minimum_rattle_stds"]
    assert stds == [0.005, 0.01, 0.02, 0.04] and summary["config"]["format_version"] == 5
    n_rand, n_press = TINY["rattled_per_system"], TINY["pressed_per_system"]
    for split in SPLITS:
        sp = summary["splits"][split]
        assert sp["minimum_rattled_frames"] == len(stds) * sp["systems"]
        assert sp["rattled_frames"] == (n_rand + len(stds)) * sp["systems"]
        assert sp["pressed_frames"] == n_press * sp["systems"]
        by_sid: dict[int, dict] = {}
        for d in _records(tiny / "s2ef" / split):
            if d.fid < BROKEN_FID:
                by_sid.setdefault(d.sid, {})[d.fid] = d
        for frames in by_sid.values():
            fids = sorted(frames)
            pressed = fids[len(fids) - n_press:]
            copies = fids[len(fids) - n_press - len(stds):len(fids) - n_press]  # minimum rattles, in stds' order
            last = frames[fids[-n_press - len(stds) - n_rand - 1]]  # the relaxation's last frame
            assert pressed == list(range(copies[-1] + 1, copies[-1] + 1 + n_press))
            assert all(frames[fid].energy > last.energy for fid in pressed)
            assert copies[0] == last.fid + n_rand + 1 and copies == list(range(copies[0], copies[0] + len(stds)))
            cell = last.cell[0].double()  # [3, 3]
            free = last.fixed == 0
            for fid, std in zip(copies, stds):
                d = frames[fid]
                frac = (d.pos.double() - last.pos.double()) @ torch.linalg.inv(cell)  # [N, 3], wrapped positions
                disp = (frac - frac.round()) @ cell  # [N, 3] minimum image
                assert disp[~free].abs().max() < 1e-5
                rms = disp[free].pow(2).mean().sqrt().item()
                assert 0.5 * std < rms < 1.6 * std, (fid, std, rms)


def test_pressed_moves_the_adsorbate_rigidly_into_the_slab_to_the_asked_contact():
    """_pressed: only adsorbate atoms move, all by one vector along -normal, to the first 0.02 A step
    whose closest adsorbate-slab distance is at most fraction x the starting one."""
    from ase.geometry import get_distances

    from leignn_ocp.data.generate import _pressed
    from leignn_ocp.testing import oc20_slab

    atoms = oc20_slab(ads="OH", height=2.0)
    n_slab = int((atoms.get_tags() != 2).sum())
    pos = atoms.positions

    def contact(p):
        return get_distances(p[n_slab:], p[:n_slab], cell=atoms.cell, pbc=True)[1].min()

    for fraction in (0.7, 0.85):
        out = _pressed(atoms, pos, n_slab, fraction)
        np.testing.assert_array_equal(out[:n_slab], pos[:n_slab])
        shift = out[n_slab:] - pos[n_slab:]  # [n_ads, 3]
        np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
        assert abs(shift[0, 0]) < 1e-12 and abs(shift[0, 1]) < 1e-12 and shift[0, 2] < 0  # fcc111 normal is z
        depth = -shift[0, 2]
        assert contact(out) <= fraction * contact(pos) + 1e-12
        less = pos.copy()
        less[n_slab:, 2] -= depth - 0.02
        assert contact(less) > fraction * contact(pos)
    with pytest.raises(ValueError, match="pressed_min_contact in \\(0, 1\\), got 2 and 1.0"):
        GenConfig(pressed_per_system=2, pressed_min_contact=1.0)


def test_is2rs_set_holds_calculator_minima_of_new_systems(tiny):
    """Each IS2RS record: the placed structure, the free EMT minimum it relaxes to (fixed atoms
    unmoved, free-atom forces under fmax) and both energies on the S2EF energies' scale."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    summary = json.loads((tiny / "s2ef" / "summary.json").read_text())
    recs = _records(tiny / "is2rs")
    assert len(recs) == summary["is2rs"]["systems"] == TINY["is2rs_systems"]
    s2ef_sids = {d.sid for split in SPLITS for d in _records(tiny / "s2ef" / split)}
    fmax = summary["config"]["fmax"]
    for d in recs:
        assert d.sid not in s2ef_sids
        fixed = d.fixed.bool()
        np.testing.assert_allclose(d.pos_relaxed[fixed].numpy(), d.pos[fixed].numpy(), atol=1e-5)
        energies = []
        for pos in (d.pos, d.pos_relaxed):
            atoms = Atoms(numbers=d.atomic_numbers.long().numpy(), positions=pos.double().numpy(),
                          cell=d.cell[0].double().numpy(), pbc=True)
            atoms.calc = EMT()
            energies.append(atoms.get_potential_energy() - d.energy_offset)
            f = atoms.get_forces()
        assert np.linalg.norm(f[~fixed.numpy()], axis=1).max() < fmax + 2e-3  # float32 positions
        assert energies[0] == pytest.approx(d.y_init, abs=2e-3) and energies[1] == pytest.approx(d.y_relaxed, abs=2e-3)
        assert d.y_relaxed < d.y_init
