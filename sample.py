"""`python sample.py ...`: see ldm/cli/sample.py and README.md. Kept at the repository root as the documented entry point."""
import sys

if __name__ == "__main__":
    from ldm.cli.errors import exit_on_usage_error

    exit_on_usage_error("sample", sys.argv[1:], "sample.py")  # mistakes, --help and list answered before torch loads
    from ldm.cli.sample import main

    main()
