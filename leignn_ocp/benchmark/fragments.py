"""How many structures of a dataset have more than one fragment (connected component of the
cutoff graph), the only ones where LEIGNN's ``global_scope: fragment`` changes anything, and
what it changes there for one model's weights.

    python -m leignn_ocp.benchmark.fragments --data data/default/s2ef --out docs/results/fragments
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from fairchem.core.datasets import LmdbDataset, data_list_collater

from leignn_ocp import ops
from leignn_ocp.model import LEIGNN

SPLITS = ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")


def fragment_stats(src: Path, model: LEIGNN, limit: int | None = None) -> dict:
    """Fragments per structure over one LMDB folder, with the fragment scope's effect on the
    energy and forces of ``model`` (untrained weights: a measure of the coupling, not of accuracy)."""
    ds = LmdbDataset({"src": str(src)})
    n = len(ds) if limit is None else min(limit, len(ds))
    counts, de, df = Counter(), [], []
    for i in range(n):
        batch = data_list_collater([ds[i]], otf_graph=True)
        src_, dst = model.generate_graph(batch).edge_index
        k = ops.connected_components(src_, dst, batch.pos.shape[0])[1]
        counts[k] += 1
        if k > 1:
            with torch.no_grad():
                model.global_scope = "structure"
                a = model(batch.clone())
                model.global_scope = "fragment"
                b = model(batch.clone())
            de.append((a["energy"] - b["energy"]).abs().item())
            df.append((a["forces"] - b["forces"]).abs().max().item())
    multi = sum(v for k, v in counts.items() if k > 1)
    return {"structures": n, "fragments_per_structure": dict(sorted(counts.items())),
            "multi_fragment": multi, "multi_fragment_share": multi / n,
            "max_abs_dE_eV": max(de, default=0.0), "max_abs_dF_eV_per_A": max(df, default=0.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/default/s2ef")
    p.add_argument("--out", default="results/fragments")
    p.add_argument("--cutoff", type=float, default=6.0)
    p.add_argument("--max-neighbors", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="structures per split (default: all)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = LEIGNN(hidden_channels=64, num_layers=3, num_rbf=32, cutoff=a.cutoff, max_neighbors=a.max_neighbors,
                   zero_init_energy=False).eval()
    stats = {"cutoff": a.cutoff, "max_neighbors": a.max_neighbors, "data": a.data,
             "splits": {s: fragment_stats(Path(a.data) / s, model, a.limit) for s in SPLITS
                        if (Path(a.data) / s).exists()}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fragments.json").write_text(json.dumps(stats, indent=1))
    lines = [f"Fragments of the {a.cutoff} Å / {a.max_neighbors}-neighbour graph in {a.data} "
             "(`python -m leignn_ocp.benchmark.fragments`)", "",
             "| split | structures | fragments per structure (count) | multi-fragment | max abs dE, dF (untrained LEIGNN) |",
             "|---|---|---|---|---|"]
    for s, r in stats["splits"].items():
        frag = ", ".join(f"{k}: {v}" for k, v in r["fragments_per_structure"].items())
        lines.append(f"| {s} | {r['structures']} | {frag} | {r['multi_fragment']} ({100 * r['multi_fragment_share']:.1f} %) "
                     f"| {r['max_abs_dE_eV']:.3g} eV, {r['max_abs_dF_eV_per_A']:.3g} eV/Å |")
    (out / "fragments.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
