"""EnfPire server."""
