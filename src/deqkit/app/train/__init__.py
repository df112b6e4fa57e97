"""The one training engine behind ``deqkit train``, ``deqkit compare`` and the benchmarks."""
