"""The contract between phone and server, free of Flask: the wire encoding, the public document, Oblivious HTTP.

The server imports these modules too (as Flask's ``sansio``): one definition of every message.
"""
