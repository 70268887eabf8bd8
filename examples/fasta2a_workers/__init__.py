"""An A2A server whose tasks run on reasonbroker workers: see README.md beside this file."""
