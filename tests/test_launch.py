"""The launcher's own command line (leignn_ocp/launch/cli.py), world-size rescaling (recipe.py) and the
fairchem version guard at import (version.py). Fast: nothing trains; two tests start one fresh
interpreter each (plain ``fairchem`` failing on ``main``; importing with a faked fairchem version)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
from fairchem.core import _cli

import leignn_ocp.cluster
import leignn_ocp.launch
from leignn_ocp import lineup
from leignn_ocp.launch import cli, patches, rescale_for_world_size, version

from conftest import REPO, cli_env, fairchem_cli

CONFIG = "configs/s2ef/200k/leignn.yml"
TRAIN = ["--mode", "train", "--config-yml", str(REPO / CONFIG), "--optim.batch_size=4", "--seed", "3"]


def _capture_main(monkeypatch) -> list:
    """Replace fairchem's main() (what the launcher calls inside its patches) by a recorder that also
    builds the config the way fairchem's main() does; returns the list of (args, overrides, config)."""
    calls = []

    def fake_main(args, override_args):
        calls.append((args, override_args, _cli.build_config(args, override_args)))

    monkeypatch.setattr(_cli, "main", fake_main)
    return calls


def _notes(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# item 1: `leignn-launch main --mode train ...`


def test_leading_main_is_dropped_and_parsed_like_fairchem():
    """``main ...`` parses to exactly what fairchem's own parser makes of ``...``."""
    plain = _cli.flags.get_parser().parse_known_args(TRAIN)
    args, overrides, options = cli.parse_args(["main", *TRAIN])
    assert (args, overrides) == plain and options.ignored_main
    assert overrides == ["--optim.batch_size=4"] and args.seed == 3 and args.mode == "train"
    args2, overrides2, options2 = cli.parse_args(TRAIN)
    assert (args2, overrides2) == plain and not options2.ignored_main
    # only a leading `main` is the old habit; anywhere else it stays what fairchem makes of it
    assert cli.parse_args([*TRAIN, "main"])[1] == ["--optim.batch_size=4", "main"]


def test_launcher_main_ignores_leading_main_once(monkeypatch, caplog):
    """Both spellings reach fairchem's main() with the same arguments; the leading ``main`` is
    reported once, naming what plain fairchem does with it. The old module spelling is the same."""
    assert leignn_ocp.cluster.main is leignn_ocp.launch.main is cli.main
    calls = _capture_main(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert cli.main(["main", *TRAIN]) == 0
    notes = _notes(caplog, "ignoring the leading `main`")
    assert len(notes) == 1 and "ValueError: not enough values to unpack" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli.main(TRAIN) == 0
    assert not _notes(caplog, "leading `main`")
    (a1, o1, c1), (a2, o2, c2) = calls
    assert (a1, o1) == (a2, o2) == _cli.flags.get_parser().parse_known_args(TRAIN)
    assert c1["optim"]["batch_size"] == c2["optim"]["batch_size"] == 4


def test_plain_fairchem_fails_on_leading_main():
    """What the README says of plain fairchem 1.10: ``fairchem main --mode train ...`` takes ``main``
    for a config override and fails while building the config, before any data is read."""
    cmd = [fairchem_cli(), "main", "--mode", "train", "--config-yml", CONFIG, "--optim.max_epochs=1"]
    res = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "ValueError: not enough values to unpack" in res.stderr, res.stderr[-2000:]
    assert "create_dict_from_args" in res.stderr  # the override parser, not anything later


# ---------------------------------------------------------------------------------------------
# item 2: --scale-recipe-to-world-size

STEP_KEYS = ("eval_every", "warmup_steps", "lr_milestones", "ema_decay")
EXPECTED = {  # (config stem, world size) -> the step-counted optim keys after rescaling (None: absent)
    ("leignn", 1): (5000, None, None, 0.999),
    ("leignn", 2): (2500, None, None, 0.999**2),
    ("leignn", 16): (312, None, None, 0.999**16),
    ("schnet", 1): (5000, 15000, [25000, 40000, 50000], None),
    ("schnet", 2): (2500, 7500, [12500, 20000, 25000], None),
    ("schnet", 16): (312, 937, [1562, 2500, 3125], None),
    ("dimenet_plus_plus", 1): (13334, 40000, [66667, 106667, 133333], None),
    ("dimenet_plus_plus", 2): (6667, 20000, [33333, 53333, 66666], None),
    ("dimenet_plus_plus", 16): (833, 2500, [4166, 6666, 8333], None),
}


def _recipe(key: str) -> dict:
    return lineup.load_config(lineup.config_path(key, "200k", REPO / "configs" / "s2ef"))


@pytest.mark.parametrize("key,world_size", sorted(EXPECTED))
def test_rescaled_recipe_table(key, world_size):
    """Step counts divided by the world size (integer, >= 1), EMA decay per step ^ world size, nothing
    else changed (batch size per rank, learning rate without --scale-lr); each change logged."""
    config = _recipe(key)
    before = json.dumps(config, sort_keys=True)
    new, lines = rescale_for_world_size(config, world_size, "none")
    assert json.dumps(config, sort_keys=True) == before  # the input is not modified
    assert tuple(new["optim"].get(k) for k in STEP_KEYS) == EXPECTED[key, world_size]
    old_optim = {k: v for k, v in config["optim"].items() if k not in STEP_KEYS}
    assert {k: v for k, v in new["optim"].items() if k not in STEP_KEYS} == old_optim
    assert {k: v for k, v in new.items() if k != "optim"} == {k: v for k, v in config.items() if k != "optim"}
    if world_size == 1:
        assert lines == [] and new == config
        return
    b = config["optim"]["batch_size"]
    assert f"{b} x {world_size} = {b * world_size} structures" in lines[0]
    for k in ("eval_every", "warmup_steps", "lr_milestones"):
        if config["optim"].get(k) is not None:
            assert f"optim.{k}: {config['optim'][k]} -> {new['optim'][k]}" in lines
    assert any(line.startswith("optim.lr_initial: ") and "unchanged" in line for line in lines)


def test_rescaled_learning_rate_and_checkpoint_every():
    config = _recipe("leignn")
    config["optim"]["checkpoint_every"] = 500
    lin, lines = rescale_for_world_size(config, 16, "linear")
    assert lin["optim"]["lr_initial"] == 2.0e-4 * 16 and lin["optim"]["min_lr"] == 1.0e-6 * 16
    assert lin["optim"]["checkpoint_every"] == 31 and "optim.checkpoint_every: 500 -> 31" in lines
    assert any(line.startswith("optim.lr_initial: 0.0002 -> 0.0032") for line in lines)
    sq, _ = rescale_for_world_size(config, 2, "sqrt")
    assert sq["optim"]["lr_initial"] == 2.0e-4 * math.sqrt(2) and sq["optim"]["eval_every"] == 2500
    assert rescale_for_world_size(config, 16, "none")[0]["optim"]["lr_initial"] == 2.0e-4
    config["optim"]["checkpoint_every"] = -1  # fairchem: only at the end of training
    assert rescale_for_world_size(config, 16, "none")[0]["optim"]["checkpoint_every"] == -1
    with pytest.raises(ValueError, match="scale_lr"):
        rescale_for_world_size(config, 2, "cubic")
    with pytest.raises(ValueError, match="world_size"):
        rescale_for_world_size(config, 0, "none")


def test_rescaling_refuses_milestones_fairchem_reads_as_epochs():
    """fairchem's warm-up/milestone schedule rejects milestones below 100: fail at launch, not on the node."""
    with pytest.raises(ValueError, match="below 100"):
        rescale_for_world_size(_recipe("schnet"), 256, "none")  # 25000 // 256 = 97


def test_launcher_flag_rescales_the_config_fairchem_runs(monkeypatch, caplog):
    """With the flag the config fairchem's main() builds (and submits) is rescaled to
    --num-nodes x --num-gpus and every change is logged; without it nothing changes."""
    calls = _capture_main(monkeypatch)
    ranks = ["--num-nodes", "2", "--num-gpus", "8", "--optim.checkpoint_every=500"]
    with caplog.at_level(logging.INFO):
        cli.main([*TRAIN, *ranks, "--scale-recipe-to-world-size", "--scale-lr", "linear"])
    optim = calls[-1][2]["optim"]
    assert (optim["eval_every"], optim["checkpoint_every"], optim["batch_size"]) == (312, 31, 4)
    assert optim["lr_initial"] == 2.0e-4 * 16 and optim["ema_decay"] == 0.999**16
    assert "--scale-recipe-to-world-size" not in calls[-1][1]  # not handed to fairchem as an override
    assert _notes(caplog, "leignn_ocp.launch: optim.eval_every: 5000 -> 312")
    assert _notes(caplog, "4 x 16 = 64 structures")
    assert _cli.build_config is patches._fairchem_build_config  # fairchem's own again after main()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cli.main([*TRAIN, *ranks])
    optim = calls[-1][2]["optim"]
    assert (optim["eval_every"], optim["checkpoint_every"], optim["lr_initial"]) == (5000, 500, 2.0e-4)
    assert not _notes(caplog, "optim.eval_every:")
    with caplog.at_level(logging.INFO):
        cli.main([*TRAIN, "--scale-recipe-to-world-size"])  # one rank: said, not changed
    assert calls[-1][2]["optim"]["eval_every"] == 5000 and _notes(caplog, "world size 1: recipe unchanged")
    with pytest.raises(SystemExit):
        cli.parse_args([*TRAIN, "--scale-lr", "sqrt"])  # --scale-lr alone would silently do nothing


# ---------------------------------------------------------------------------------------------
# item 7: another fairchem-core is refused when the launcher is imported


def test_version_guard_names_the_supported_fairchem(monkeypatch):
    assert version.is_supported(version.installed_fairchem())  # what the tests run on
    assert patches.WRITTEN_FOR == version.WRITTEN_FOR == "1.10"
    version.check_fairchem_version("1.10.0")
    monkeypatch.delenv(version.VERSION_ENV, raising=False)
    for found in ("2.3.0", "1.100.0", "1.1"):
        with pytest.raises(ImportError, match=rf"fairchem-core 1\.10\.x internals, but fairchem-core {found} is"):
            version.check_fairchem_version(found)
    with pytest.raises(ImportError, match=r"fairchem-core==1\.10\.\* .* LEIGNN_LAUNCH_ANY_FAIRCHEM=1"):
        version.check_fairchem_version("2.3.0")
    with pytest.raises(ImportError, match="fairchem-core is not installed"):
        version.check_fairchem_version("(not installed)")
    monkeypatch.setenv(version.VERSION_ENV, "1")
    with pytest.warns(UserWarning, match="fairchem-core 2.3.0 is installed"):
        version.check_fairchem_version("2.3.0")


GUARD_PROBE = """
import json, importlib.metadata as md
real = md.version
md.version = lambda name: "2.3.0" if name == "fairchem-core" else real(name)
import leignn_ocp
from leignn_ocp import lineup
out = {"model": type(leignn_ocp.LEIGNN(**lineup.get("leignn").tiny)).__name__}
try:
    import leignn_ocp.launch
    out["launch"] = "imported"
except ImportError as err:
    out["launch"] = str(err)
print(json.dumps(out))
"""


def test_launcher_import_refuses_another_fairchem_but_the_model_does_not():
    """In a fresh interpreter that reports fairchem-core 2.3.0: ``import leignn_ocp`` and building the
    model still work, ``import leignn_ocp.launch`` (what leignn-launch runs first) fails naming 1.10.x."""
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    env.pop(version.VERSION_ENV, None)
    res = subprocess.run([sys.executable, "-c", GUARD_PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["model"] == "LEIGNN"
    assert "fairchem-core 1.10.x internals, but fairchem-core 2.3.0 is installed" in out["launch"]
