"""The one training loop (``train``, ``tune``, the baselines and seed pretraining), and what it stands on.

- ``loop``: :func:`~moekit.train.loop.run_loop` over a :class:`~moekit.train.loop.LoopJob`:
  optimiser, micro-batches, gradient accumulation and clipping, evaluation, checkpoints;
- ``schedule``: the step budget, learning rate and data order, pure functions of the step;
- ``engine``: where it runs (one process, DDP or FSDP2 under torchrun; DCP checkpoints);
- ``checkpoints``: resumable checkpoints and the fingerprint a resume must match;
- ``metrics``: ``metrics.jsonl`` (and TensorBoard);
- ``evaluation``: held-out loss of packed blocks;
- ``saving``: the trained weights written back as a Hugging Face directory;
- ``compute``: model FLOPs per token, the budget baselines are matched on.

Nothing here imports a step or a command.
"""
