"""A study's cells and features, read through the embedcache store API only.

* :mod:`.cells` — the cells, labels and feature sets a study reads; :mod:`.policy` — when features are
  read out of core; :mod:`.chunked` — features larger than memory, in row blocks.
"""
