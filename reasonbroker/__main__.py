"""`python -m reasonbroker`: the same CLI as the `reasonbroker` script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main(prog_name="reasonbroker")
