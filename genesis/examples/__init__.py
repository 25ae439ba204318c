"""Alias of :mod:`genesis_core.examples`."""
