"""Structure-aware fuzzing of the two model-file kinds pyprune reads: ``.ppz`` containers
and graph files (issue 19). ``mutate`` makes mutants, ``harness`` runs each through the
CLI in worker processes and sorts the outcomes; ``python -m tests.fuzz`` is the long run
(``make fuzz``), ``test_fuzz.py`` the short one in the suite."""
