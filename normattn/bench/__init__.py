"""Benchmarks behind ``normattn bench``: the subjects and passes measured and how (``measure``), peak
memory (``memory``), the CPU run with one fresh process per case (``cpu``), the CUDA stages
(``cuda``), CSV/PNG/markdown output (``report``) and the command line (``cli``)."""
