"""The test suite as a package, so that tests/server/ is tests.server and never shadows the gateway's
``server`` package (pytest would otherwise put tests/ first on sys.path)."""
