"""Optional integrations with the trainers people already run (each an extra in setup.py).

Import the submodule you need (``gift_fast.integrations.verl``, ...); ``import gift_fast`` never
imports a trainer.
"""
