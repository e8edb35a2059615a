"""`python -m nanomt.eval checkpoint=DIR [eval.tasks=[...]]`: see nanomt/eval/cli.py."""

from nanomt.eval.cli import main

main()
