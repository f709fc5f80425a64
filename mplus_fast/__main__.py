"""`python -m mplus_fast ...` runs the `mplus-fast` command line."""
from mplus_fast.cli import app

app(prog_name="mplus-fast")
