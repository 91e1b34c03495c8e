"""Imported by each script before anything loads torch: GNU OpenMP's idle threads then spin 3,000
rounds, not 300,000, before they sleep, so a run beside other jobs keeps near its share of the
cores (BENCHMARKS.md, "A busy machine"). OpenMP reads GOMP_SPINCOUNT once, when torch loads it.
A setting of the user's (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept."""
import os

if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "3000"
