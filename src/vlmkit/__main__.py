"""`python -m vlmkit ...` (and `torchrun -m vlmkit train ...`) run the CLI."""

from vlmkit.cli import main

if __name__ == "__main__":
    main()
