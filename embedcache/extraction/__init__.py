"""Extraction: image files in, a finished, verified feature set in the store out.

* :mod:`.runner` — :func:`~.runner.extract`, the entry point; :mod:`.options` — every option, declared once;
* :mod:`.plan` — what an extraction computes and where it writes, fixed before any cell is read;
* :mod:`.pipeline` — decode in workers, compute on the device, write chunks in a thread;
* :mod:`.distributed` — the same chunks as Dask tasks; :mod:`.importing` — embeddings computed elsewhere;
* :mod:`.new_images` — embed new images exactly as a stored feature set was made (neighbour look-ups).
"""
