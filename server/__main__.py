"""`python -m server ...` is the same as the `gemma-server` command."""

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
