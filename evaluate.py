"""`python evaluate.py ...`: see ldm/cli/evaluate.py and README.md. Kept at the repository root as the documented entry point."""
import sys

if __name__ == "__main__":
    from ldm.cli.errors import exit_on_usage_error

    exit_on_usage_error("evaluate", sys.argv[1:], "evaluate.py")  # mistakes, --help and list answered before torch loads
    from ldm.cli.evaluate import main

    main()
