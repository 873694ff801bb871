"""Hypothesis strategies, the tolerance rule and reusable property suites: public API for checking
any kernel (ours or a third party's) against the oracles."""
