"""Multi-process training, applied from outside the model (torchtitan-style): ``launch`` (torchrun's environment ->
a process group with a collective timeout), ``mesh`` (the ``parallel`` config section -> a DeviceMesh), ``fsdp``
(FSDP2 ``fully_shard`` per decoder block), ``sync`` (the engine's own plain model and the trainer -> engine weight
sync), ``collectives`` (the data-parallel reductions the trainer uses). Nothing here runs in a one-process run."""
