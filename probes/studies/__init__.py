"""The studies, one module each, every one filling :mod:`probes.engine.skeleton`'s shape.

* :mod:`.scale` — macro-F1 against cells per class (``probes scale``);
* :mod:`.evaluate` — one fit on the full training split (``probes eval``);
* :mod:`.robustness` — clean-trained probes on perturbed test cells (``probes robustness``);
* :mod:`.audit` — rank cells by how likely their label is wrong (``probes audit``).

The functions are exported by :mod:`probes` (``probes.scale``...); this package exports none, so no
function here shadows a module.
"""
