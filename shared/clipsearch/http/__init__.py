"""The HTTP API shared by the search and dataset functions: models, error mapping, routes, OpenAPI."""
