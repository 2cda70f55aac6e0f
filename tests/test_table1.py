"""Table 1 (leignn_ocp.evaluation): hand-checkable metrics, table files, the S2EF submission round
trip, the line-up's subsets and fairchem arguments, and the commands that run it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from leignn_ocp import evaluation as ev
from leignn_ocp import lineup
from leignn_ocp.batching import labelled_data
from leignn_ocp.data import write_lmdb_dir as write_lmdb
from leignn_ocp.evaluation import cli, runs
from leignn_ocp.testing import emt_slab_frames

REPO = Path(__file__).resolve().parents[1]

# two structures: the first 3 atoms (1 fixed), the second 2 atoms (1 fixed)
E_TRUE = np.array([0.0, 0.0])
E_PRED = np.array([0.01, 0.5])
F_TRUE_FREE = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
F_PRED_FREE = np.array([[1.02, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
NFREE = np.array([2, 1])
# energy MAE (0.01 + 0.5) / 2 = 255 meV; force MAE (0.02 + 1 + 1) / 9 components = 224.44 meV/A;
# cosines 1, 1, 0 -> 2/3; EFwT: structure 1 (|dE| 0.01 < 0.02, max |dF| 0.02 < 0.03) passes,
# structure 2 fails -> 50 %
HAND = {"energy_mae_meV": 255.0, "forces_mae_meV_per_A": 2020.0 / 9, "forces_cos": 2 / 3, "efwt_percent": 50.0}


def _check(got, want, rel=1e-6):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-9), f"{k}: {got[k]} != {v}"


def test_metrics_by_hand():
    got = ev.metrics_from_arrays(E_PRED, E_TRUE, F_PRED_FREE, F_TRUE_FREE, NFREE)
    _check(got, HAND)
    assert got["n_structures"] == 2
    perfect = ev.metrics_from_arrays(E_TRUE, E_TRUE, F_TRUE_FREE, F_TRUE_FREE, NFREE)
    _check(perfect, {"energy_mae_meV": 0.0, "forces_mae_meV_per_A": 0.0, "forces_cos": 1.0, "efwt_percent": 100.0})
    with pytest.raises(ValueError, match="shapes differ"):
        ev.metrics_from_arrays(E_PRED, E_TRUE, F_PRED_FREE[:2], F_TRUE_FREE, NFREE)


def test_table_files(tmp_path):
    row = ev.metrics_from_arrays(E_PRED, E_TRUE, F_PRED_FREE, F_TRUE_FREE, NFREE)
    other = dict(row, energy_mae_meV=100.0, forces_mae_meV_per_A=10.0)
    results = {"LEIGNN": {t: row for _, _, t in lineup.SPLITS}, "PaiNN": {t: other for _, _, t in lineup.SPLITS}}
    md = ev.write_outputs(results, tmp_path, "test", extra={"LEIGNN": {"params": 5}})
    assert "| LEIGNN | 255.0 | 224.4 | 255.0 | 224.4 | 255.0 | 224.4 | 255.0 | 224.4 |" in md
    assert "| PaiNN | 100.0 | 10.0 |" in md
    assert "| LEIGNN | 0.667 | 50.00 |" in md
    back = ev.read_csv(tmp_path / "table1.csv")
    assert set(back) == {"LEIGNN", "PaiNN"} and set(back["LEIGNN"]) == {"ID", "OOD-Ads", "OOD-Cat", "OOD-Both"}
    _check(back["LEIGNN"]["OOD-Cat"], HAND, rel=1e-5)
    assert (tmp_path / "table1.png").stat().st_size > 1000
    with open(tmp_path / "table1.csv") as f:
        assert len(list(csv.reader(f))) == 1 + 8


# ----------------------------------------------------------------------------- LMDB helpers
def known_split(sid0: int) -> list[Data]:
    """The two structures of the hand-checked example, OC20 field names (y, force)."""
    out = []
    forces_all = [np.vstack([np.zeros((1, 3)), F_TRUE_FREE[:2]]), np.vstack([np.zeros((1, 3)), F_TRUE_FREE[2:]])]
    for k, (n, f) in enumerate(zip([3, 2], forces_all)):
        out.append(Data(
            pos=torch.rand(n, 3) * 5, cell=torch.eye(3).unsqueeze(0) * 10, atomic_numbers=torch.full((n,), 29.0),
            natoms=n, fixed=torch.tensor([1.0] + [0.0] * (n - 1)), tags=torch.tensor([0] + [1] * (n - 1)),
            y=float(E_TRUE[k]), force=torch.tensor(f, dtype=torch.float32), sid=sid0 + k, fid=k,
        ))
    return out


def fake_predictions(path: Path, ids, e, f_free, nfree) -> Path:
    """A file in the layout trainer.predict writes (free-atom forces, chunk_idx)."""
    np.savez_compressed(path, ids=np.array(ids), energy=np.asarray(e, np.float32),
                        forces=np.asarray(f_free, np.float32), chunk_idx=np.cumsum(nfree)[:-1])
    return path


def test_submission_round_trip(tmp_path):
    data = tmp_path / "data"
    files = {}
    for j, (key, suffix, _) in enumerate(lineup.SPLITS):
        write_lmdb(data / f"val_{suffix}", known_split(100 * j))
        # predictions stored in reverse order: the scorer matches them by id
        ids = [f"{100 * j + 1}_1", f"{100 * j}_0"]
        files[key] = fake_predictions(tmp_path / f"{key}.npz", ids, E_PRED[::-1],
                                      np.vstack([F_PRED_FREE[2:], F_PRED_FREE[:2]]), NFREE[::-1])
    sub = ev.make_submission(files, tmp_path / "submission")
    assert sub.name == "submission.npz"
    z = np.load(sub)
    assert {f"{k}_{f}" for k, _, _ in lineup.SPLITS for f in ("ids", "energy", "forces", "chunk_idx")} <= set(z.files)
    scores = ev.score_submission(sub, data)
    for _, _, title in lineup.SPLITS:
        _check(scores[title], HAND, rel=1e-5)
    # a structure missing from the submission is an error, not a silently smaller test set
    write_lmdb(data / "val_id", known_split(0) + known_split(7))
    with pytest.raises(ValueError, match="missing from the submission"):
        ev.score_submission(sub, data)


def test_cli_dispatch_defaults_to_quick():
    with pytest.raises(SystemExit, match="checkpoint"):
        cli.main(["--data", "x"])


def test_device_is_the_gpu_when_present_unless_cpu(monkeypatch, caplog):
    """quick / table / lineup / predict: cuda when torch sees a GPU, --cpu forces the CPU, the old
    --gpu is accepted (and a GPU it asks for but cannot get is an error); the choice is logged."""
    from leignn_ocp.evaluation.checkpoints import resolve_device

    caplog.set_level("INFO")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == "cuda" and resolve_device(gpu=True) == "cuda"
    assert "device: cuda" in caplog.text
    assert resolve_device(cpu=True) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == "cpu" and resolve_device(cpu=True) == "cpu"
    assert "device: cpu (no GPU visible" in caplog.text
    with pytest.raises(ValueError, match="--gpu given"):
        resolve_device(gpu=True)
    with pytest.raises(ValueError, match="exclude"):
        resolve_device(cpu=True, gpu=True)
    # every evaluating sub-command takes both flags (not together)
    ap = cli._parser()
    for cmd in (["quick", "c"], ["table", "--run", "a=b"], ["lineup"], ["predict", "c"]):
        assert ap.parse_args([*cmd, "--cpu"]).cpu and ap.parse_args([*cmd, "--gpu"]).gpu
        with pytest.raises(SystemExit):
            ap.parse_args([*cmd, "--cpu", "--gpu"])


def test_predict_names_every_missing_test_split(tmp_path):
    """`predict --split-prefix test_`: the four folders are checked before any model is loaded;
    the error names each missing one and the command that downloads them."""
    root = tmp_path / "s2ef" / "all"
    write_lmdb(root / "test_id", known_split(0))
    (tmp_path / "model.pt").write_bytes(b"not loaded")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", str(tmp_path / "model.pt"), "--data-root", str(root), "--split-prefix", "test_",
                  "--cpu", "--out", str(tmp_path / "sub")])
    msg = str(exc.value)
    assert all(str(root / f"test_{s}") in msg for s in ("ood_ads", "ood_cat", "ood_both"))
    assert str(root / "test_id") not in msg and "leignn-oc20-data download --split test" in msg
    assert not (tmp_path / "sub").exists()
    # the default prefix of predict is test_, and its default dtype fairchem's float16
    a = cli._parser().parse_args(["predict", "ckpt"])
    assert (a.split_prefix, a.dtype) == ("test_", "float16")


# ----------------------------------------------------------------------------- real trainer path
def _emt_structures(n: int, seed: int, sid0: int) -> list[Data]:
    """The kit's EMT slab frames as fairchem records, under OC20's own field names (y, force),
    so that the configs' key_mapping is exercised too."""
    out = []
    for i, atoms in enumerate(emt_slab_frames(n, seed)):
        d = labelled_data(atoms)
        d["y"], d["force"] = float(d["energy"]), d["forces"]
        del d["energy"], d["forces"]
        d.sid, d.fid = sid0 + i, 0
        out.append(d)
    return out


@pytest.mark.slow
def test_checkpoint_predict_submission_score_agree(tmp_path):
    """Train a tiny LEIGNN with the fairchem CLI; Table-1 metrics from the trainer path, from the
    submission file through the local scorer, and from the `leignn-evaluate` command agree."""
    from conftest import cli_env, fairchem_cli

    data = tmp_path / "data"
    write_lmdb(data / "train", _emt_structures(8, 0, 0))
    for j, (_, suffix, _) in enumerate(lineup.SPLITS):
        write_lmdb(data / f"val_{suffix}", _emt_structures(4, j + 1, 1000 * (j + 1)))
    cmd = [fairchem_cli(), "--mode", "train", "--config-yml", str(REPO / "configs/s2ef/default/leignn.yml"), "--cpu",
           "--run-dir", str(tmp_path / "runs"), "--timestamp-id", "tiny", "--optim.max_epochs=1",
           f"--dataset.train.src={data / 'train'}", f"--dataset.val.src={data / 'val_id'}",
           "--model.hidden_channels=16", "--model.num_layers=1",
           "--model.num_rbf=8", "--optim.batch_size=4"]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ckpt = ev.find_checkpoint(tmp_path / "runs", "final")
    direct = ev.evaluate_checkpoint(ckpt, data, "val_")
    files = ev.predict_splits(ckpt, data, tmp_path / "pred", prefix="val_", dtype="float32")
    sub32 = ev.make_submission(files, tmp_path / "pred" / "submission.npz")
    scored = ev.score_submission(sub32, data)
    for _, _, title in lineup.SPLITS:
        _check(scored[title], {k: direct[title][k] for k in ev.COLUMNS}, rel=1e-4)

    # `predict` as a user runs it: fairchem's default float16 energy/forces (the configs say float32);
    # ids and chunk_idx as in the float32 file, values within float16 rounding, the scorer agrees
    assert cli.main(["predict", str(ckpt), "--data-root", str(data), "--split-prefix", "val_",
                     "--out", str(tmp_path / "pred16")]) == 0
    z16, z32 = np.load(tmp_path / "pred16" / "submission.npz"), np.load(sub32)
    assert set(z16.files) == set(z32.files)
    eps, bound = 2.0**-11, {}  # float16 rounding: relative error <= 2^-11
    for key, _, title in lineup.SPLITS:
        for f in ("energy", "forces"):
            assert z16[f"{key}_{f}"].dtype == np.float16 and z32[f"{key}_{f}"].dtype == np.float32, (key, f)
            x16, x32 = z16[f"{key}_{f}"].astype(np.float64), z32[f"{key}_{f}"].astype(np.float64)
            assert np.all(np.abs(x16 - x32) <= eps * np.abs(x32) + 1e-7), (key, f)
            bound[title, f] = 1000 * eps * np.abs(x32).max() + 1e-4  # meV: bound on the MAE change
        np.testing.assert_array_equal(z16[f"{key}_ids"], z32[f"{key}_ids"])
        np.testing.assert_array_equal(z16[f"{key}_chunk_idx"], z32[f"{key}_chunk_idx"])
    scored16 = ev.score_submission(tmp_path / "pred16" / "submission.npz", data)
    for _, _, title in lineup.SPLITS:
        got, want = scored16[title], scored[title]
        assert abs(got["energy_mae_meV"] - want["energy_mae_meV"]) <= bound[title, "energy"]
        assert abs(got["forces_mae_meV_per_A"] - want["forces_mae_meV_per_A"]) <= bound[title, "forces"]
        assert got["forces_cos"] == pytest.approx(want["forces_cos"], abs=2e-3)
        assert got["n_structures"] == want["n_structures"]

    # the console command, spelled as scripts/run_main.sh calls it (no sub-command = quick)
    out = tmp_path / "quick"
    p = subprocess.run([_command("leignn-evaluate"), "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.startswith("| model | ID E | ID F |")
    quick = next(iter(json.loads((out / "table1.json").read_text())["results"].values()))
    for _, _, title in lineup.SPLITS:
        _check(quick[title], {k: direct[title][k] for k in ev.COLUMNS}, rel=1e-6)


def test_lineup_subsets_are_seeded_and_stable(tmp_path):
    """`lineup --train-size/--eval-size`: the same seeded subsets for every model (and every rerun)."""
    data = tmp_path / "data"
    write_lmdb(data / "train", [s for k in range(5) for s in known_split(10 * k)])  # 10 structures
    for j, (_, suffix, _) in enumerate(lineup.SPLITS):
        write_lmdb(data / f"val_{suffix}", [s for k in range(3) for s in known_split(1000 * (j + 1) + 10 * k)])
    assert ev.subset_data(data, tmp_path / "a", None, None, 0) == data  # no sizes: the data as they are
    sub = ev.subset_data(data, tmp_path / "a", 4, 2, 0)
    assert sub == tmp_path / "a" / "data"

    def sids(path):
        from fairchem.core.datasets import LmdbDataset

        ds = LmdbDataset({"src": str(path)})
        out = sorted(int(ds[i].sid) for i in range(len(ds)))
        ev.close_lmdb(ds)
        return out

    train = sids(sub / "train")
    assert len(train) == 4 and set(train) <= set(sids(data / "train"))
    for _, suffix, _ in lineup.SPLITS:
        assert len(sids(sub / f"val_{suffix}")) == 2
    stamp = sub / "subset.json"
    made = stamp.stat().st_mtime_ns
    assert ev.subset_data(data, tmp_path / "a", 4, 2, 0) == sub and stamp.stat().st_mtime_ns == made  # reused
    again = ev.subset_data(data, tmp_path / "b", 4, 2, 0)
    assert sids(again / "train") == train and sids(again / "val_ood_cat") == sids(sub / "val_ood_cat")
    assert ev.subset_data(data, tmp_path / "a", 50, None, 0) == tmp_path / "a" / "data"  # sizes above n: all
    assert len(sids(tmp_path / "a" / "data" / "train")) == 10 and len(sids(tmp_path / "a" / "data" / "val_id")) == 6


# ----------------------------------------------------------------------------- line-up plumbing, commands
def test_lineup_train_and_fit_share_one_argument_list(tmp_path):
    """Training and scale fitting get one argument list, built from parameters; fairchem's own
    parser reads it as meant."""
    from fairchem.core.common.flags import flags

    cfg, run_dir, sub = Path("configs/s2ef/default/painn.yml"), tmp_path / "runs", tmp_path / "sub"
    args = runs.train_args(cfg, run_dir, "painn_fit", "painn", seed=3, epochs=2, data=sub, cpu=True,
                           extra=["--optim.batch_size=8"])
    assert args == ["--mode", "train", "--config-yml", str(cfg), "--run-dir", str(run_dir),
                    "--timestamp-id", "painn_fit", "--identifier", "painn", "--seed", "3", "--print-every", "50",
                    "--optim.max_epochs=2", f"--dataset.train.src={sub / 'train'}",
                    f"--dataset.val.src={sub / 'val_id'}", "--optim.batch_size=8", "--cpu"]
    parsed, overrides = flags.get_parser().parse_known_args(args)
    assert (parsed.mode, parsed.timestamp_id, parsed.identifier, parsed.seed, parsed.cpu) == (
        "train", "painn_fit", "painn", 3, True)
    assert str(parsed.config_yml) == str(cfg)
    assert overrides == args[-5:-1]
    # the config's own budget, data and device: nothing added
    plain = runs.train_args(cfg, run_dir, "painn", "painn", cpu=False)
    assert plain == ["--mode", "train", "--config-yml", str(cfg), "--run-dir", str(run_dir), "--timestamp-id",
                     "painn", "--identifier", "painn", "--seed", "0", "--print-every", "50"]


def test_lineup_models_by_key_or_alias(tmp_path):
    for key in ("leignn", "dimenet_plus_plus", "painn"):
        (tmp_path / f"{key}.yml").write_text("{}")
    (tmp_path / "mine.yml").write_text("{}")
    assert runs.lineup_keys(tmp_path) == ["painn", "dimenet_plus_plus", "leignn"]  # registry order
    assert runs.lineup_keys(tmp_path, ["dimenetpp", "LEIGNN", "mine"]) == ["dimenet_plus_plus", "leignn", "mine"]
    with pytest.raises(SystemExit, match="schnet.yml"):
        runs.lineup_keys(tmp_path, ["schnet"])


def _command(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{name} not found next to {sys.executable}: re-run `pip install -e .`")
    return str(exe)


@pytest.mark.parametrize("spelling", ["console", "script", "module"])
def test_evaluate_commands_run(spelling):
    """The three spellings of the command, one process each (a torch + fairchem import apiece):
    `leignn-evaluate --help` lists every sub-command; the old `python scripts/evaluate.py` with no
    sub-command is `quick`; `python -m leignn_ocp.evaluation fit-scales`, as the line-up runs it."""
    if spelling == "console":
        p = subprocess.run([_command("leignn-evaluate"), "--help"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert all(sub in p.stdout for sub in cli.COMMANDS)
    elif spelling == "script":
        p = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--data", "x"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and "quick: give a checkpoint" in p.stderr, p.stderr[-3000:]
    else:
        p = subprocess.run([sys.executable, "-m", "leignn_ocp.evaluation", "fit-scales", "--help"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "--num-batches" in p.stdout and "scale_file" in p.stdout


@pytest.mark.slow
def test_seeded_lineup_end_to_end(tmp_path, monkeypatch):
    """The real command: two models x two seeds through the fairchem CLI on EMT-labelled LMDBs;
    one row file per (model, seed) with its learning curve, mean ± std over the seeds, and a
    second call that finds every row done and trains nothing."""
    monkeypatch.chdir(REPO)
    data = tmp_path / "data"
    for split, (n, seed) in {"train": (16, 0), "val_id": (4, 1), "val_ood_ads": (4, 2), "val_ood_cat": (4, 3),
                             "val_ood_both": (4, 4)}.items():
        write_lmdb(data / split, [labelled_data(a, sid=i) for i, a in enumerate(emt_slab_frames(n, seed))])
    out = tmp_path / "lineup"
    argv = ["lineup", "--config-dir", "configs/s2ef/default", "--models", "leignn", "schnet", "--seeds", "0", "1",
            "--epochs", "1", "--data-root", str(data), "--out", str(out), "--cpu",
            "--", "--optim.batch_size=4", "--optim.eval_every=2", "--optim.checkpoint_every=-1",
            "--model.hidden_channels=16"]
    assert cli.main(argv) == 0
    rows = sorted(p.name for p in (out / "rows").glob("*.json"))
    assert rows == ["leignn_s0.json", "leignn_s1.json", "schnet_s0.json", "schnet_s1.json"]
    row = json.loads((out / "rows" / "leignn_s1.json").read_text())
    assert row["seed"] == 1 and row["steps"] == 4  # 16 structures / batch 4
    assert [s for s, _ in row["curve"]] == [2, 4]  # val force MAE at every eval_every
    agg = json.loads((out / "table1.json").read_text())
    assert list(agg) == ["SchNet", "LEIGNN"]  # the registry's order
    f = [json.loads((out / "rows" / f"leignn_s{s}.json").read_text())["results"]["ID"]["forces_mae_meV_per_A"]
         for s in (0, 1)]
    assert f[0] != f[1]  # the seed reaches the run
    assert agg["LEIGNN"]["mean"]["ID"]["forces_mae_meV_per_A"] == pytest.approx(np.mean(f))
    assert agg["LEIGNN"]["std"]["ID"]["forces_mae_meV_per_A"] == pytest.approx(np.std(f, ddof=1))
    assert f"{np.mean(f):.1f} ± {np.std(f, ddof=1):.1f}" in (out / "table1.md").read_text()
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "table1.png").stat().st_size > 0
    made = {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    assert cli.main(argv) == 0  # resumes: nothing left to train
    assert {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")} == made


def test_equal_wall_time_reads_the_learning_curves():
    """A model 2x slower than LEIGNN is read at half LEIGNN's steps (log-linear between
    validations), a faster one past its last validation is only bounded, and so is one that is
    so slow it never reached its first validation."""
    from leignn_ocp.evaluation.tables import equal_time_markdown

    def entry(values):  # two seeds, validations at steps 40, 80, 120, 160 (force MAE in eV/Å)
        curve = [(40 * (i + 1), v) for i, v in enumerate(values)]
        return {"steps": 160, "curves": [curve, curve]}

    agg = {"LEIGNN": entry([0.4, 0.3, 0.25, 0.2]), "Slow": entry([0.8, 0.4, 0.2, 0.1]),
           "Fast": entry([0.5, 0.45, 0.4, 0.35]), "Slowest": entry([0.9, 0.8, 0.7, 0.6]), "Unmeasured": entry([1, 1])}
    md = equal_time_markdown(agg, {"LEIGNN": 100.0, "Slow": 200.0, "Fast": 50.0, "Slowest": 1000.0})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in md.splitlines()[2:]}
    assert rows["LEIGNN"][1:3] == ["160", "200"]
    assert rows["Slow"][1:3] == ["80", "400"]  # 160 steps x 100 / 200 ms; the curve at step 80
    assert rows["Fast"][1:3] == ["320", "<= 350"]
    assert rows["Slowest"][1:3] == ["16", ">= 900"]
    assert rows["Unmeasured"] == ["-", "-", "-", "- |"]


def test_equal_wall_time_waits_for_leignns_row(tmp_path):
    """A partial line-up (--models without LEIGNN so far) writes its table with a note instead of
    failing after the training (the row files are kept either way)."""
    from leignn_ocp.evaluation.cli import _equal_time

    costs = tmp_path / "benchmark.csv"
    costs.write_text("label,train_ms\nLEIGNN,100\nMACE,400\n")
    row = json.loads((REPO / "docs/results/table1_default/rows/mace_s0.json").read_text())
    text = _equal_time([row], costs)
    assert "LEIGNN has no row here yet" in text


def test_a_single_seed_shows_no_spread():
    """One seed has no standard deviation: its cells are the value alone, not "± 0.0"."""
    from leignn_ocp.evaluation.tables import aggregate, seeded_markdown

    rows = [json.loads((REPO / f"docs/results/table1_default/rows/mace_s{s}.json").read_text()) for s in (0, 1)]
    one = [line for line in seeded_markdown(aggregate(rows[:1])).splitlines() if line.startswith("| MACE |")]
    two = [line for line in seeded_markdown(aggregate(rows)).splitlines() if line.startswith("| MACE |")]
    assert one and "±" not in " ".join(one)
    assert "±" in two[0] and two[0].count("±") == 8
