"""Optional integrations of reasonbroker with other frameworks; each behind its own extra."""
