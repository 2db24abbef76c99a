"""swapd's benchmark suite (not part of the test suite): ``python -m bench --help``."""
