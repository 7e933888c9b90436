"""Oblivious HTTP (RFC 9458) on the server side: the gateway, its key configurations and a development relay.

Only ``gateway`` and ``keys`` need the ``ohttp`` extra; importing the package needs nothing.
"""
