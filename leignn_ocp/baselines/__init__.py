"""Baselines of the paper's Table 1 that fairchem 1.10 does not ship, as fairchem models.

Configs name them by module path (``name: leignn_ocp.baselines.cgcnn.CGCNN``), which fairchem's
registry imports on demand, so ``import leignn_ocp`` does not pull in mace-torch / e3nn.
"""
