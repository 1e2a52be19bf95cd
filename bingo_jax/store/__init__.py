"""What a run keeps on disk: paths and atomic writes (``fileio``), model files (``model_io``),
checkpoints (``checkpointing``) and their integrity checks (``checkpoint_integrity``,
``finite``), the workdir's records (``workdir_records``) and its lock (``workdir_lock``).

May import: models, configs.
"""
