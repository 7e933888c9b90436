"""Benchmarks: speed and size targets on the phone, the server and national catalogues (``python -m tools.bench``)."""
