"""Command-line tools (``deqkit train``, ``deqkit eval``, ``deqkit demo``).

This is the only place where strings are mapped to solver, adjoint and model objects.
"""
