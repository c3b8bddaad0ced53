"""
The load tool, ``python -m wschat.bench``: loads any relay-to-all WebSocket server and reports
deliveries/s, latency percentiles, loss and reordering (see :mod:`wschat.bench.options`).
"""
