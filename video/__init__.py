"""Video to states: frame decoding and sampling, the temporal aggregator (issue #4)."""
