"""Examples of reasonbroker with other frameworks (run from the repository root)."""
