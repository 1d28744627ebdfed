"""Speech to states: log-mel features, the Conformer encoder, BEST-RQ, the speech adapter (issue #5)."""
