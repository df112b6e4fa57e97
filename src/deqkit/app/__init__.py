"""The application layer: ``deqkit train``, ``eval``, ``compare``, ``demo`` and ``generate``.

This is the only place where names (``"anderson"``, ``"conv_deq"``) become objects, and nothing in
the library imports it: the packages below (zoo, nn, hyperdeq, stability, the core) know nothing
about command lines, run folders or configs.
"""
