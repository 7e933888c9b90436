"""Dummy requests: personas walking the public catalogue, the plans they make, and the scheduler that sends them."""
