"""Bad checkpoints give one error naming the file and the problem, and a failed resume leaves the run
folder as it was: a resume whose model differs from the checkpoint's (fairchem 1.10: a size-mismatch
RuntimeError per tensor, or the optimizer's "parameter group that doesn't match"), a truncated file,
a checkpoint of another model class (PaiNN) given to a LEIGNN config or to the LEIGNN calculator.

One tiny LEIGNN run through the real ``fairchem`` CLI makes the checkpoint; the resumes go through
the CLI too, the rest through the same Trainer built in this process (debug mode: it writes nothing)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import cli_env, emt_slab_frames, fairchem_cli, write_s2ef_lmdb
from leignn_ocp import lineup
from leignn_ocp.trainer import CheckpointError

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/s2ef/200k/leignn.yml"
TINY = [f"--model.{k}={v}" for k, v in lineup.get("leignn").tiny.items()]  # hidden_channels 16
RUN_ID = "base"  # --timestamp-id: the checkpoint folder's name, so that a resume can name it again


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt_errors")
    write_s2ef_lmdb(emt_slab_frames(8, seed=0), root / "train")
    write_s2ef_lmdb(emt_slab_frames(4, seed=1), root / "val")
    return {"train": root / "train", "val": root / "val", "root": root}


def _fairchem(lmdbs, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``fairchem --mode train`` of the tiny LEIGNN on the tiny LMDBs, 1 thread, into ``run_dir``."""
    cmd = [fairchem_cli(), "--mode", "train", "--config-yml", CONFIG, "--cpu", "--run-dir", str(run_dir),
           "--timestamp-id", RUN_ID, f"--dataset.train.src={lmdbs['train']}", f"--dataset.val.src={lmdbs['val']}",
           "--optim.batch_size=4", "--optim.eval_batch_size=4", "--optim.num_workers=0", "--optim.eval_every=2",
           *TINY, *extra]
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(lmdbs) -> Path:
    """A finished 1-epoch run (2 steps): checkpoint.pt, best_checkpoint.pt, normalizers.pt, tensorboard log."""
    run_dir = lmdbs["root"] / "run"
    res = _fairchem(lmdbs, run_dir, "--optim.max_epochs=1")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert (run_dir / "checkpoints" / RUN_ID / "checkpoint.pt").is_file()
    return run_dir


def _ckpt(run_dir: Path, name: str = "checkpoint.pt") -> Path:
    return run_dir / "checkpoints" / RUN_ID / name


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# ----------------------------------------------------------------------------- resume via the CLI
RESUMES = {
    # --checkpoint <run>/checkpoints/base/checkpoint.pt with hidden_channels 32 (the checkpoint's: 16)
    "explicit_other_width": (["--model.hidden_channels=32", "--checkpoint", "{ckpt}"],
                             r"does not fit this run's model leignn_ocp\.LEIGNN: 43 of its 45 tensors have another "
                             r"shape in this model \(global_emb: \[1, 16\] in the checkpoint, \[1, 32\] here"),
    # no --checkpoint: fairchem's TrainTask resumes <checkpoint_dir>/checkpoint.pt by itself
    "auto_other_width": (["--model.hidden_channels=32"],
                         r"hidden_channels = 16 in the checkpoint, 32 here\..*resumes a run folder's own "
                         r"checkpoint\.pt by itself"),
    "auto_truncated": ([],
                       r"cannot be read: it starts as a torch archive but its end \(the zip directory\) is "
                       r"missing, so the file \(\d+ bytes\) is truncated"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUMES))
def test_failed_resume_names_the_file_and_changes_nothing(case, lmdbs, run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    ckpt = _ckpt(run_dir)
    if case == "auto_truncated":
        _truncate(_ckpt(run), ckpt)
    before = _digests(run_dir)
    extra, match = RESUMES[case]
    res = _fairchem(lmdbs, run_dir, "--optim.max_epochs=3", *[a.format(ckpt=ckpt) for a in extra])
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-4000:]
    assert f"CheckpointError: checkpoint {ckpt} " in log, log[-4000:]
    assert re.search(match, log, re.S), log[-4000:]
    assert "size mismatch" not in log and "doesn't match the size of optimizer's group" not in log
    assert "Evaluating on val." not in log  # no step was trained
    after = _digests(run_dir)
    assert {k: after.get(k) for k in before} == before  # checkpoints and logs byte for byte
    # what the failed run adds: fairchem's tensorboard writer opens a new events file in __init__
    new = sorted(set(after) - set(before))
    assert all(k.startswith(f"logs/tensorboard/{RUN_ID}/events.out.tfevents.") for k in new), new
    assert all((run_dir / k).stat().st_size < 200 for k in new)  # its header: nothing was logged


# ----------------------------------------------------------------------------- the same Trainer in process
def _trainer(lmdbs, tmp_path, *overrides: str, config: str = CONFIG):
    """leignn_ocp.trainer.Trainer as fairchem's new_trainer_context builds it (debug: writes nothing)."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import build_config, setup_imports

    argv = ["--mode", "train", "--config-yml", str(REPO / config), "--cpu", "--debug", "--run-dir", str(tmp_path),
            f"--dataset.train.src={lmdbs['train']}", "--optim.num_workers=0", *TINY, *overrides]
    args, override = flags.get_parser().parse_known_args(argv)
    c = build_config(args, override)
    del c["dataset"]["val"]  # one LMDB environment per trainer (py-lmdb opens a folder once per process)
    setup_imports(c)
    return registry.get_trainer_class(c["trainer"])(
        task=c.get("task", {}), model=c["model"], outputs=c["outputs"], dataset=c["dataset"], optimizer=c["optim"],
        loss_functions=c["loss_functions"], evaluation_metrics=c["evaluation_metrics"], identifier="t",
        run_dir=str(tmp_path), is_debug=True, logger=c["logger"], local_rank=0, cpu=True)


@pytest.fixture
def make_trainer(lmdbs, tmp_path):
    from leignn_ocp.evaluation.checkpoints import close_lmdb

    made = []

    def make(*overrides: str):
        if made:
            close_lmdb(made[-1].train_loader)  # the one before: py-lmdb opens a folder once per process
        made.append(_trainer(lmdbs, tmp_path / f"t{len(made)}", *overrides))
        return made[-1]

    yield make
    if made:
        close_lmdb(made[-1].train_loader)


@pytest.fixture(scope="module")
def painn_ckpt(run, lmdbs) -> Path:
    """A PaiNN checkpoint in fairchem's layout: the LEIGNN run's checkpoint.pt with a tiny PaiNN's
    config and weights in place of LEIGNN's (normalizers, optimizer and the rest as saved)."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    tiny = {**lineup.get("painn").tiny, "use_pbc": True, "otf_graph": True, "regress_forces": True,
            "direct_forces": False}
    painn = registry.get_model_class("painn")(**tiny)
    ck["config"]["model"] = {"name": "painn", **tiny}
    ck["state_dict"] = {f"module.{k}": v for k, v in painn.state_dict().items()}
    ck.pop("ema", None), ck.pop("optimizer", None)
    path = lmdbs["root"] / "painn.pt"
    torch.save(ck, path)
    return path


def test_a_good_checkpoint_still_loads(run, make_trainer):
    from fairchem.core.common.utils import match_state_dict

    t = make_trainer()
    t.load_checkpoint(str(_ckpt(run)))
    saved = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert t.step == saved["step"] == 2
    mine = t.model.state_dict()
    theirs = match_state_dict(mine, saved["state_dict"])  # the "module." prefix of fairchem's wrapper
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_other_width_in_process(run, make_trainer):
    """The same check as the CLI resume, with the whole message; the trainer's state is untouched."""
    t = make_trainer("--model.hidden_channels=32")
    ck = _ckpt(run)
    with pytest.raises(CheckpointError) as err:
        t.load_checkpoint(str(ck))
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {ck} does not fit this run's model leignn_ocp.LEIGNN: 43 of its 45 tensors")
    assert "The model settings differ: hidden_channels = 16 in the checkpoint, 32 here." in msg
    assert msg.endswith("or train this model in a new run (another --run-dir or --timestamp-id).")
    assert t.step == 0 and t.best_val_metric is None  # raised before fairchem set anything


def test_other_depth_and_strict_load_false(run, make_trainer):
    """Another number of layers: fairchem 1.10's first error is the optimizer's "loaded state dict contains
    a parameter group that doesn't match the size of optimizer's group", with or without strict_load."""
    with pytest.raises(CheckpointError, match=r"21 of this model's tensors are not in it \(layers\.1\.aggregate\."
                                              r"mlp\.0\.weight, .* and 17 more\)\. The model settings differ: "
                                              r"num_layers = 2 in the checkpoint, 3 here\. Resume with"):
        make_trainer("--model.num_layers=3").load_checkpoint(str(_ckpt(run)))
    # strict_load false does not make it a partial resume: the optimizer state cannot follow
    t = make_trainer("--model.num_layers=3", "--task.strict_load=False")
    with pytest.raises(CheckpointError, match=r"its optimizer state is for parameter groups of \[44\] tensors, "
                                              r"this run's optimizer has groups of \[65\].*num_layers = 2 in the "
                                              r"checkpoint, 3 here"):
        t.load_checkpoint(str(_ckpt(run)))
    # nor does the EMA (fairchem would load its 44 shadow tensors over 23 parameters without looking)
    t = make_trainer("--model.num_layers=1", "--task.strict_load=False")
    with pytest.raises(CheckpointError, match=r"its EMA weights \(44 tensors\) do not match this model's 23 "
                                              r"trainable parameters\. The model settings differ: num_layers = 2 "
                                              r"in the checkpoint, 1 here\. Load it with the config it was trained"):
        t.load_checkpoint(str(_ckpt(run)), inference_only=True)
    # best_checkpoint.pt (no EMA, no optimizer state): strict_load false loads the tensors the two models
    # share, with a warning naming the rest
    logger = logging.getLogger()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        t.load_checkpoint(str(_ckpt(run, "best_checkpoint.pt")), inference_only=True)
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING and "strict_load" in r.getMessage()]
    best = _ckpt(run, "best_checkpoint.pt")
    assert warned == [f"task.strict_load: false: loading checkpoint {best} partially: 21 of its tensors are left "
                      "out (layers.0.aggregate.mlp.0.weight, layers.0.aggregate.mlp.0.bias, "
                      "layers.0.aggregate.mlp.2.weight, layers.0.aggregate.mlp.2.bias and 17 more)"]


def test_truncated_checkpoint_everywhere(run, make_trainer, tmp_path):
    from leignn_ocp.evaluation import load_trainer
    from leignn_ocp.md.calculator import LEIGNNCalculator

    half = _truncate(_ckpt(run), tmp_path / "half.pt")
    match = (rf"^checkpoint {half} cannot be read: it starts as a torch archive but its end \(the zip directory\) "
             rf"is missing, so the file \({half.stat().st_size} bytes\) is truncated: an interrupted save or copy\. "
             r".*\(torch\.load: RuntimeError: PytorchStreamReader failed reading zip archive")
    with pytest.raises(CheckpointError, match=match):
        make_trainer().load_checkpoint(str(half))
    with pytest.raises(CheckpointError, match=match):
        load_trainer(half)
    with pytest.raises(CheckpointError, match=match):
        LEIGNNCalculator(half)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"checkpoint {empty} cannot be read: the file is empty \(0 bytes\)"):
        LEIGNNCalculator(empty)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=rf"checkpoint {text} cannot be read: it is not a file torch\.save "
                                              r"wrote \(17 bytes\) or it is corrupted"):
        load_trainer(text)
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        LEIGNNCalculator(tmp_path / "missing.pt")


def test_not_a_checkpoint(run, tmp_path):
    from leignn_ocp.evaluation import load_trainer
    from leignn_ocp.md.calculator import LEIGNNCalculator

    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    del ck["config"]
    torch.save(ck, tmp_path / "no_config.pt")
    for load in (LEIGNNCalculator, load_trainer):
        with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path / 'no_config.pt'} has no config with a "
                                                  r"model name .* so its model cannot be rebuilt$"):
            load(tmp_path / "no_config.pt")

    norm = _ckpt(run, "normalizers.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {norm} is not a fairchem checkpoint: it has no "
                                              r"'state_dict' or 'normalizers' \(its keys: energy, forces\) "
                                              r"\(normalizers\.pt holds only"):
        LEIGNNCalculator(norm)


def test_painn_checkpoint_to_a_leignn_config(painn_ckpt, make_trainer):
    t = make_trainer()
    with pytest.raises(CheckpointError, match=rf"^checkpoint {painn_ckpt} holds a painn "
                                              r"\(fairchem\.core\.models\.painn\.painn\.PaiNN\) model, but this "
                                              r"run's model is leignn_ocp\.LEIGNN \(leignn_ocp\.model\.LEIGNN\): a "
                                              r"checkpoint loads only into the model class it was trained as"):
        t.load_checkpoint(str(painn_ckpt))
    assert t.step == 0


def test_painn_checkpoint_to_the_leignn_calculator(painn_ckpt):
    from leignn_ocp.md.calculator import LEIGNNCalculator

    with pytest.raises(CheckpointError, match=rf"^checkpoint {painn_ckpt} is a checkpoint of painn "
                                              r"\(fairchem\.core\.models\.painn\.painn\.PaiNN\), not of LEIGNN: "
                                              r"LEIGNNCalculator runs LEIGNN checkpoints"):
        LEIGNNCalculator(painn_ckpt)


def test_weights_that_do_not_fit_their_own_config(run, tmp_path):
    """An edited file: config says hidden_channels 32, the weights are 16 wide. The loaders rebuild the
    model from the config, so the error says the file contradicts itself."""
    from leignn_ocp.evaluation import load_trainer
    from leignn_ocp.md.calculator import LEIGNNCalculator

    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    ck["config"]["model"]["hidden_channels"] = 32
    path = tmp_path / "edited.pt"
    torch.save(ck, path)
    match = (rf"^checkpoint {path} does not fit this run's model leignn_ocp\.LEIGNN: 43 of its 45 tensors have "
             r"another shape in this model \(global_emb: \[1, 16\] in the checkpoint, \[1, 32\] here; .*\)\. The "
             r"config saved in the checkpoint builds this same model, so its weights do not match its own config")
    with pytest.raises(CheckpointError, match=match):
        LEIGNNCalculator(path)
    with pytest.raises(CheckpointError, match=match):
        load_trainer(path)
