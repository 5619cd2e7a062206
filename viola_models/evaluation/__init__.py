"""How good a mask is against the truth: the INSTANCE 2022 metrics and volumes (``metrics``, a leaf
that ``inference`` also uses for volumes), and an ensemble scored on test scans with paired
differences and two-level bootstrap intervals between arms (``scoring``)."""
