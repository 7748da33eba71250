"""`python -m tuning`: the same command as `keras-adam-tune`."""

from tuning.cli import main

if __name__ == "__main__":
    main()
