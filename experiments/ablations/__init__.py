"""The paper's claims that carry over to data available offline, checked on digits and MNIST.

``python -m experiments.ablations --accelerator=cpu --workdir=DIR [--preset=small]
[--check=offset|orthogonal|plain|all]`` (:mod:`.main`, the runner's flags):

* ``offset`` (:mod:`.offset_temperature`): the offset / temperature trade-off of the loss;
* ``orthogonal`` (:mod:`.orthogonality`): per-layer norms and distance from orthogonal;
* ``plain`` (:mod:`.aol_vs_plain`): AOL against an unconstrained net of the same shape.

Each prints Markdown tables and writes ``offset_temperature``, ``orthogonality`` or
``aol_vs_plain`` ``.md``, ``.json`` and ``.png`` into the workdir; the config and recipes
are in :mod:`.configs` (presets ``full`` and ``small``).
"""
