"""Abliteration: a structured search for the (refusal, KL) front of per-layer directional ablations, and exports."""
