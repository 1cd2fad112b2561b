"""`python train.py ...`: see ldm/cli/train.py and README.md. Kept at the repository root as the documented entry point."""
import sys

if __name__ == "__main__":
    from ldm.cli.errors import exit_on_usage_error

    exit_on_usage_error("train", sys.argv[1:], "train.py")  # mistakes, --help and list answered before torch loads
    from ldm.cli.train import main

    main()
