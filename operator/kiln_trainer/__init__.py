"""kiln_trainer: the program a TrainingJob's pods run (images/trainer). See README "Trainer" for the contract.

Modules: ``config`` (CLI/env -> validated TrainConfig, no torch), ``report`` (exit codes, failure classes,
progress file, termination message), ``data``, ``models``, ``checkpoint``, ``loop`` (the training loop, ``main``).
"""

from .report import ExitCode

__all__ = ["ExitCode"]
