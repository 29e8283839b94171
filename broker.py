"""`python broker.py ...` is `mpqueue broker ...`: a thin entry point for users of the source tree."""
import sys

from mpqueue.cli import main

if __name__ == "__main__":
    main(["broker", *sys.argv[1:]], prog_name="mpqueue")
