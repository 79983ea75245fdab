"""``python -m experiments.study``."""
from experiments.study.cli import main

if __name__ == "__main__":
    main()
