"""`python sample.py ...`: see ldm/cli/sample.py and README.md. Kept at the repository root as the documented entry point."""
from ldm.cli.sample import main

if __name__ == "__main__":
    main()
