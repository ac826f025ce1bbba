"""Profiling tools; ``profiler.testbed`` builds a shaped multi-namespace network to run ranks in (needs root)."""
