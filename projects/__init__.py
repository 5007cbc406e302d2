"""Scripts that use up2 (demo, benchmarks, checkpoint conversion); a package so that tests import them."""
