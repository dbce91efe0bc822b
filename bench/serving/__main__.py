"""`python -m bench.serving`: the serving benchmark, which `pdserve bench` runs."""
import sys

from bench.serving.runner import main

sys.exit(main())
