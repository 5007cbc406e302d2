"""Benchmarks of up2: speed (``speed.py`` with ``flops.py``, ``peers.py``, ``profiling.py``), learning on shapes."""
