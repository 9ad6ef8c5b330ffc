"""The benchmark harness of mist-suite: every number the README quotes, measured side by side in one run.

    python -m bench.run            # full run (~20 min on 2 CPU cores): bench/results/latest.json + REPORT.md + PNGs
    python -m bench.run --quick    # smoke run (~2 min)

See bench/README.md for what each section measures and every key of latest.json.
"""
