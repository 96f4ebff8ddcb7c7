"""`python -m svdq`: the same as the `svdq` command."""
from svdq.cli import main

if __name__ == "__main__":
    main()
