"""The paper's claims that carry over to data available offline, checked on digits and MNIST.

``python -m experiments.ablations {offset,orthogonal,plain,all} --accelerator=cpu --workdir=DIR [--small]``:

* ``offset`` (:mod:`.offset_temperature`): the offset / temperature trade-off of the loss;
* ``orthogonal`` (:mod:`.orthogonality`): per-layer norms and distance from orthogonal;
* ``plain`` (:mod:`.aol_vs_plain`): AOL against an unconstrained net of the same shape.

Each prints Markdown tables and writes ``<check>.md``, ``<check>.json`` and ``<check>.png``
into the output directory; the recipes are in :mod:`.config`.
"""
