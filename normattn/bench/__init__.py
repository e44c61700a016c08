"""Benchmarks behind ``normattn bench``: CPU timing and memory of every backend (``cpu``), the CUDA
benches (``flash``, ``linear``, ``rows``), shared timing helpers (``timing``) and report writing
(``report``)."""
