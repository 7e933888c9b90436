"""The HTTP API: the Flask app factory, the admin app, index updates, admission control and the OpenAPI spec."""
