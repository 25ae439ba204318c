"""Alias package so the spec's ``from genesis.core import ...`` works. Re-exports only."""
