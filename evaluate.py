"""`python evaluate.py ...`: see ldm/cli/evaluate.py and README.md. Kept at the repository root as the documented entry point."""
from ldm.cli.evaluate import main

if __name__ == "__main__":
    main()
