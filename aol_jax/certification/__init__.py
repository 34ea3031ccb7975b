"""Certification, one concept per module: the margin rule (:mod:`.rule`), margins
(:mod:`.margins`), what a layer states (:mod:`.protocol`), the bound on a frozen kernel
(:mod:`.kernel_bounds`), the two rounding models (:mod:`.probabilistic`, :mod:`.worst_case`),
the table (:mod:`.results`) and the dataset driver with its table of modes (:mod:`.dataset`).

The public names are re-exported by :mod:`aol_jax`; nothing is re-exported here.
"""
