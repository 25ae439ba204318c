"""Worked examples of the public interfaces (``python -m genesis.examples.interfaces_demo``)."""
