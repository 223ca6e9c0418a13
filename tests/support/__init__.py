"""Helpers shared by the tests: real Unix users, real agent processes."""
