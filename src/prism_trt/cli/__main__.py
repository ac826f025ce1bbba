import sys

from . import main

# The name the console script has: usage lines and shell completion (_PRISM_TRT_COMPLETE) match it.
sys.exit(main(prog_name="prism-trt"))
