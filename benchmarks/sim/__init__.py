"""Replica simulator: a vLLM-faithful engine model, its HTTP face and a virtual-time driver.

``profiles`` (GPU + model constants), ``engine`` (the pure, clock-driven step model),
``exposition`` (real-format `/metrics` per engine flavour), ``virtual`` (discrete-event driver
for many engines in virtual time); ``calibrate`` and ``speed`` are the benchmarks.
"""
