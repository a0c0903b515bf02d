"""Experiments built on the simulators and load generators; each writes a report and its JSON."""
