"""The study engine: the skeleton every study fills, its shared options, where fits run, intervals.

* :mod:`.skeleton` — the shape of a study; :mod:`.options` — what every study shares;
* :mod:`.split_fits` / :mod:`.proba_fits` — fits on splits, scored on test cells or out of fold;
* :mod:`.runtime`, :mod:`.dask_fits`, :mod:`.threads` — where and on how many threads fits run;
* :mod:`.intervals` — 95% intervals over test cells and paired comparisons.
"""
