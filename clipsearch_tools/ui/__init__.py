"""The `clipsearch ui` web page: a local server for the page's static files and a proxy to the stack's HTTP API."""
