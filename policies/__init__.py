"""Routing policies: pure, synchronous, standard library only."""
