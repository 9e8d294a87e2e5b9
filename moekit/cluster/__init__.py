"""Where jobs run: Slurm through its commands (``slurm``), processes on this machine (``processes``).

This package knows schedulers, not moekit's stages: ``moekit.steps.run`` decides what runs where.
"""
