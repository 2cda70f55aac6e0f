"""ASE calculator for a trained LEIGNN checkpoint.

A thin layer over fairchem's own ``OCPCalculator`` (which builds the trainer from the
config stored in the checkpoint, loads the weights and the energy/force normalizers, and
de-normalises the predictions). What it adds:

* positions of periodic structures are **wrapped into the cell** before the graph is
  built (MD lets atoms leave the cell; fairchem's ``radius_graph_pbc`` assumes they are
  inside). The atoms given by the caller are not modified.
* the EMA weights stored in a training checkpoint (``checkpoint.pt``) are used when
  present (fairchem's inference-only loading ignores them; ``best_checkpoint.pt`` already
  holds EMA weights), see ``use_ema``.
* a one-time warning when the model predicts **direct forces**: they come from a
  separate output head, not from -dE/dx, so they are *not conservative*. The energy is not
  conserved in NVE with them; run MD with a thermostat, or train with
  ``direct_forces: false`` for gradient (conservative) forces.

A checkpoint that is missing, truncated, not a fairchem checkpoint, of another model (a PaiNN
checkpoint) or with weights that do not fit its own config raises
:class:`leignn_ocp.trainer.CheckpointError` naming the file, before any model is built.

Usage::

    from leignn_ocp.md import LEIGNNCalculator
    atoms.calc = LEIGNNCalculator("runs/md/checkpoints/<id>/best_checkpoint.pt")
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.geometry import wrap_positions
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.common.relaxation.ase_utils import ASE_PROP_RESHAPE, OCPCalculator

import leignn_ocp  # noqa: F401  (registers the model with fairchem's registry)
from leignn_ocp.trainer import TRAINER_PATH, CheckpointError, model_class, model_config, read_checkpoint

log = logging.getLogger(__name__)

DIRECT_FORCES_WARNING = (
    "LEIGNN checkpoint %s predicts DIRECT forces (a separate output head, not -dE/dx): "
    "they are not conservative, so total energy drifts in NVE. Use a thermostat "
    "(Langevin / Nose-Hoover / Bussi) or a model trained with direct_forces: false."
)


def require_leignn(ckpt: dict, path) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt``'s config builds a LEIGNN (before fairchem builds
    whatever model it names)."""
    from leignn_ocp.model import LEIGNN

    config = ckpt.get("config")
    name = model_config(config)[0] if isinstance(config, dict) else None
    if name is None:
        raise CheckpointError(f"checkpoint {path} has no config with a model name (fairchem writes the run's "
                              "config into every checkpoint it saves), so its model cannot be rebuilt")
    cls = model_class(name)
    if cls is None or not issubclass(cls, LEIGNN):
        what = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "not a model known here"
        raise CheckpointError(f"checkpoint {path} is a checkpoint of {name} ({what}), not of LEIGNN: "
                              "LEIGNNCalculator runs LEIGNN checkpoints (model name leignn_ocp.LEIGNN); "
                              "fairchem's OCPCalculator runs its other models")


class ReusingOCPCalculator(OCPCalculator):
    """fairchem's ``OCPCalculator`` for one system stepped many times (MD, relaxations).

    fairchem's ``calculate`` converts the Atoms (AtomsToGraphs), collates a batch and runs
    ``trainer.predict`` on every call. For a structure whose atoms, cell, periodicity, tags and
    fixed atoms stay the same, this one keeps the batch and replaces only its positions, then runs
    the same ``trainer._forward`` and ``trainer._denorm_preds`` that ``predict`` runs: the same
    numbers without the per-step conversion. The model still builds its graph from the positions of
    each step (``otf_graph``; a checkpoint that reads stored edges takes fairchem's path).

    ``reuse``: False gives fairchem's own path on every call. ``compile``: run the model under
    ``torch.compile`` (dynamic shapes: the edge count changes from step to step); the first calls
    compile (seconds), later ones run the compiled code.
    """

    def __init__(self, *args, reuse: bool = True, compile: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # stored edges would go stale as atoms move; a molecule box is re-centred on every conversion
        self.reuse = reuse and not self.a2g.r_edges and self.a2g.molecule_cell_size is None
        self._template = None  # (key, batch)
        if compile:
            self.trainer.model = torch.compile(self.trainer.model, dynamic=True)

    @staticmethod
    def _system_key(atoms: Atoms) -> tuple:
        """What the kept batch depends on besides positions (AtomsToGraphs' other fields)."""
        from ase.constraints import FixAtoms

        fixed = sorted(int(i) for c in atoms.constraints if isinstance(c, FixAtoms) for i in c.index)
        return (atoms.numbers.tobytes(), np.asarray(atoms.cell).tobytes(), tuple(atoms.pbc.tolist()),
                atoms.get_tags().tobytes(), tuple(fixed))

    def _batch(self, atoms: Atoms):
        """The batch for ``atoms``: the kept one with new positions, or a new one (fairchem's)."""
        key = self._system_key(atoms)
        if self._template is None or self._template[0] != key:
            batch = data_list_collater([self.a2g.convert(atoms)], otf_graph=True).to(self.trainer.device)
            self._template = (key, batch)
            return copy.copy(batch)  # models may set fields of the batch they get: keep the template as made
        batch = copy.copy(self._template[1])
        # AtomsToGraphs.convert's own positions: wrapped along the periodic axes (eps=0), then float32
        pos = wrap_positions(atoms.get_positions(), atoms.get_cell(complete=True), pbc=atoms.pbc, eps=0)
        batch.pos = torch.from_numpy(pos).float().to(self.trainer.device)
        return batch

    def calculate(self, atoms: Atoms | None = None, properties=("energy", "forces"),
                  system_changes=all_changes) -> None:
        if not (self.reuse and isinstance(atoms, Atoms)):
            return super().calculate(atoms, properties, system_changes)
        Calculator.calculate(self, atoms, properties, system_changes)
        trainer = self.trainer
        trainer.model.eval()
        batch = self._batch(atoms)
        with torch.no_grad():  # as trainer.predict; -dE/dx models enable grad themselves
            out = trainer._forward(batch)
            for key in trainer.config["outputs"]:
                pred = trainer._denorm_preds(key, out[key], batch)
                pred = pred.item() if pred.numel() == 1 else pred.cpu().numpy()
                if key in ASE_PROP_RESHAPE:
                    pred = pred.reshape(ASE_PROP_RESHAPE[key]).squeeze()
                self.results[key] = pred


class LEIGNNCalculator(ReusingOCPCalculator):
    """ASE calculator for LEIGNN checkpoints (energy in eV, forces in eV/A).

    Args:
        checkpoint_path: a fairchem checkpoint of a LEIGNN model (``checkpoint.pt`` or
            ``best_checkpoint.pt`` written by ``fairchem --mode train``).
        cpu: run on CPU (default) or on the first GPU.
        seed: seed for the trainer (defaults to the one in the checkpoint).
        wrap: wrap periodic positions into the cell before building the graph.
        use_ema: load the EMA weights of a training checkpoint if it has them.

    Direct forces (``direct_forces: true``, the paper's LEIGNN) are **not conservative**;
    see the module docstring. ``self.direct_forces`` tells which kind the model predicts.
    """

    _warned: set[str] = set()

    def __init__(self, checkpoint_path: str | Path, cpu: bool = True, seed: int | None = None,
                 wrap: bool = True, use_ema: bool = True, **kwargs) -> None:
        ckpt = read_checkpoint(checkpoint_path)  # names the file: missing, empty, truncated, not a checkpoint
        require_leignn(ckpt, checkpoint_path)
        # the project's trainer: its load_checkpoint checks every tensor before fairchem loads any
        kwargs.setdefault("trainer", TRAINER_PATH)
        super().__init__(checkpoint_path=str(checkpoint_path), cpu=cpu, seed=seed, **kwargs)
        self.wrap = wrap
        self.checkpoint_path = str(checkpoint_path)
        model = self.trainer._unwrapped_model
        model = getattr(model, "_orig_mod", model)  # the module itself under torch.compile
        self.model = model
        self.used_ema = use_ema and self._load_ema(ckpt)
        regress = bool(getattr(model, "regress_forces", True))
        self.direct_forces = regress and bool(getattr(model, "direct_forces", False))
        self.use_pbc = bool(getattr(model, "use_pbc", True))
        self.model.eval()
        if regress and not self.direct_forces:
            self._check_gradient_force_normalizers()
        if self.direct_forces and self.checkpoint_path not in LEIGNNCalculator._warned:
            LEIGNNCalculator._warned.add(self.checkpoint_path)
            log.warning(DIRECT_FORCES_WARNING, self.checkpoint_path)

    def _check_gradient_force_normalizers(self) -> None:
        """Gradient forces are -dE/dx of the reported energy only if energy and forces are
        de-normalised with the same scale; warn when the checkpoint's normalizers differ."""
        norms = getattr(self.trainer, "normalizers", {})
        if "energy" in norms and "forces" in norms:
            se, sf = float(norms["energy"].rmsd), float(norms["forces"].rmsd)
            if abs(se - sf) > 1e-6 * max(abs(se), abs(sf), 1.0):
                log.warning(
                    "conservative LEIGNN checkpoint %s de-normalises energy (rmsd %.4g) and forces "
                    "(rmsd %.4g) with different scales: its forces are %.3g x -dE/dx of the reported "
                    "energy. Train with equal energy/force rmsd (see configs/md/"
                    "ethanol_leignn_conservative.yml).", self.checkpoint_path, se, sf, sf / se)

    def _load_ema(self, ckpt: dict) -> bool:
        checkpoint_path = self.checkpoint_path
        ema = ckpt.get("ema")
        if not ema or "shadow_params" not in ema:
            return False
        params = [p for p in self.model.parameters() if p.requires_grad]
        shadow = ema["shadow_params"]
        if len(shadow) != len(params) or any(s.shape != p.shape for s, p in zip(shadow, params)):
            log.warning("EMA weights in %s do not match the model; using the raw weights", checkpoint_path)
            return False
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.device, p.dtype))
        return True

    def model_input(self, atoms: Atoms) -> Atoms:
        """The structure the model sees: periodic positions wrapped into the cell (a copy)."""
        if self.wrap and atoms.pbc.any() and atoms.cell.rank == 3:
            atoms = atoms.copy()
            atoms.wrap(eps=1e-7)
        if atoms.pbc.any() and not self.use_pbc:
            log.debug("periodic atoms given to a model trained with use_pbc=False: no images are used")
        return atoms

    def calculate(self, atoms: Atoms | None = None, properties=("energy", "forces"),
                  system_changes=all_changes) -> None:
        """fairchem's ``OCPCalculator.calculate`` (AtomsToGraphs -> collater -> trainer.predict)
        on :meth:`model_input`; ASE's cache keeps the caller's (unwrapped) atoms."""
        atoms = self.atoms if atoms is None else atoms
        super().calculate(self.model_input(atoms), properties, system_changes)
        self.atoms = atoms.copy()
        if "energy" in self.results:
            self.results["energy"] = float(self.results["energy"])
            self.results["free_energy"] = self.results["energy"]
        if "forces" in self.results:
            self.results["forces"] = np.asarray(self.results["forces"], dtype=np.float64).reshape(-1, 3)  # [N, 3]
