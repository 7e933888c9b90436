"""Privacy evaluation: the testbed, the attackers, linked photos, the open set and dummy histories (``python -m tools.evaluate``)."""
