"""Evaluation: perplexity by position (the `hylo eval` command), recall scoring (MQAR, passkey), generation and
the run report."""
