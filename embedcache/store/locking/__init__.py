"""Writer locks behind one interface (:mod:`.base`): flock and in-process (:mod:`.flock`), leases (:mod:`.lease`)."""
