"""XLA flags for every process the test suite starts (conftest and the multi-host workers).

LLVM at -O0: the suite's tiny programs are compiled far more than they are run.
Backend compilation was 57% of the wall time of three typical test files, and
-O0 cuts it by 40%. The whole suite (README command, 2 cores) went from
16 min 38 s to 13 min 3 s, its summed test time from 1933 s to 1511 s; a few
runtime-heavy tests got slower. XLA's HLO passes (fusion, layouts, sharding)
still run as they do for users; the demo test runs without these flags, as a
user runs it.
"""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
