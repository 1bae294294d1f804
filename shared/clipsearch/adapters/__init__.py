"""Adapters: the real implementations of the ports, each named technology + role."""
