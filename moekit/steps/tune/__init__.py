"""``moekit tune``: train a mixed MoE (router first of all) with load balancing.

- ``run``: :func:`tune`, the step (load, data mixture, the shared training loop, save);
- ``inputs``: which MoE and data (a run directory, a model of a run, or given), and their checks;
- ``trainable``: what ``--train`` trains, and the selection biases of ``--balance bias``;
- ``new_expert``: ``--train new-expert+router`` after ``mix --add-expert``;
- ``record``: provenance, model card and the held-out routing of the tuned MoE.
"""

from moekit.steps.tune.run import TuneResult, tune

__all__ = ["TuneResult", "tune"]
