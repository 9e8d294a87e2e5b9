"""``moekit mix``: dense branches (or copies of one seed) merged into one Hugging Face MoE, and grown later.

- ``build``: :func:`mix`, the streaming writer of the MoE (globals, then each layer's averaged
  tensors, router and experts);
- ``inputs``: opening and checking the seed and branches (headers only), expert order, averaging
  weights, and what a run directory or ``--expert``/``--upcycle`` names as inputs;
- ``plan``: the shape of an MoE block (experts, widths, shared expert, the scales that keep it exact);
- ``tensors``, ``experts``, ``merge``: averaged tensors, expert tensors, TIES/DARE/task-arithmetic merges;
- ``router``: the centroid router initialisation (calibration data through the averaged layers);
- ``output``: config.json and the model card;
- ``grow``, ``grow_inputs``, ``grow_router``: ``mix --add-expert``, one more expert in a built MoE;
- ``average``: the uniform weight average of the branches (a baseline).
"""

from moekit.steps.mix.build import MixResult, mix

__all__ = ["MixResult", "mix"]
