"""`python train.py ...`: see ldm/cli/train.py and README.md. Kept at the repository root as the documented entry point."""
from ldm.cli.train import main

if __name__ == "__main__":
    main()
