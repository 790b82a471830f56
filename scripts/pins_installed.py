"""Exit 0 when every ``name==version`` line of the requirements file argv[1] is installed at that
version in this Python (2.13.0+cpu counts as 2.13.0), 1 otherwise: the set-up scripts skip pip,
whose resolver takes tens of seconds even with nothing to install."""

import re
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
    if line and not match:
        sys.exit(1)  # not a plain pin: let pip decide
    try:
        if match and version(match[1]).split("+")[0] != match[2].split("+")[0]:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
