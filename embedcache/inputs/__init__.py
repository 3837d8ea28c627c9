"""Where cells come from and how their pixels are read, before any model sees them.

* :mod:`.sources` — image sources (folders, manifests, arrays): one row per cell with a stable id;
* :mod:`.images` — decode any common image mode / dtype to ``(H, W, 3)`` uint8 RGB, and the pixel digest;
* :mod:`.perturb` — named, deterministic perturbations (blur before / after the working size, JPEG, noise);
* :mod:`.urls` — URLs that carry credentials are refused before any library sees them.
"""
