"""The local stack: the same handlers as in AWS, wired to services running on this machine."""
