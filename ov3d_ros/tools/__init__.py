"""Command-line tools built on the core (offline mapping, demo)."""
