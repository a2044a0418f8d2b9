"""Multi-process training, applied from outside the model (torchtitan-style): ``launch`` (torchrun's environment ->
a process group with a collective timeout, the cross-rank config check), ``mesh`` (the ``parallel`` config section ->
a DeviceMesh), ``fsdp`` (FSDP2 ``fully_shard`` per decoder block), ``sync`` (the engine's own plain model and the
trainer -> engine weight sync), ``ulysses`` (sequence parallelism), ``checkpoint`` (sharded checkpoints). The
trainer's data-parallel reductions live in ``ossrl.train.trainer``. Nothing here runs in a one-process run."""
