"""kiln_trainer: the program a TrainingJob's pods run (images/trainer; docs/trainer.md).

Modules: ``config`` (CLI/env -> validated TrainConfig, no torch), ``report`` (the progress file), ``data`` (the
base model), ``models``, ``checkpoint``, ``loop`` (the training loop, ``main``). Exit codes, failure classes and
the termination message are every workload's: kiln_artifacts.contract.
"""
