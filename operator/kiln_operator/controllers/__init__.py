"""The controllers of the three kinds: what each does around its state machine (its own I/O), no kopf wiring."""
