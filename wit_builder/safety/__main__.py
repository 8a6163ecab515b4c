"""`python -m wit_builder.safety phash DIR_OR_FILE...`: print `<phash hex>  <path>` per image, the
entries of a phash blocklist (`[filter] blocklists = [{kind = "phash", ...}]` reads the first
field of each line) for images you hold yourself.

Example:
    python -m wit_builder.safety phash takedowns/ | cut -d' ' -f1 > lists/takedowns.phash.txt
"""

from __future__ import annotations

import sys

from wit_builder.safety.evalset import _phash_file, eval_files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "phash":
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    try:
        files = eval_files(args[1:])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = 0
    for path in files:
        h = _phash_file(path)
        if h is None:
            print(f"skipped (does not decode): {path}", file=sys.stderr)
            bad += 1
        else:
            print(f"{h:016x}  {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
