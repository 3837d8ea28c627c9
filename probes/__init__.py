"""probes: fast linear / kNN / SVM probes and studies on an embedcache feature store."""
