"""Experiments built on :mod:`aol_jax`; the library never imports from here."""
