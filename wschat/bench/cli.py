"""
``python -m wschat.bench``: parse the command line, run each measurement it asks for, and print
the results (as text or JSON), with a chart of a rate sweep if asked.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from twisted.python import usage

from wschat.bench.options import Options
from wschat.bench.plot import plot
from wschat.bench.report import describe
from wschat.bench.run import Progress, Run


def main(argv: list[str] | None = None, out: TextIO | None = None) -> list[dict[str, Any]]:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\nwschat.bench: error: {e}\n")
        raise SystemExit(2) from None
    out = out or sys.stdout
    progress = Progress(sys.stderr, not options["quiet"])
    results = []
    for group in options["groups"]:
        for rate in options["rates"]:
            try:
                result = Run(options, group, rate, progress).execute()
            except (OSError, RuntimeError) as e:
                progress.done()
                sys.stderr.write(f"wschat.bench: {'+'.join(s[0] for s in group)}: {e}\n")
                raise SystemExit(1) from None
            results.append(result)
            if not options["json"]:
                out.write(describe(result) + "\n")
                out.flush()
    if options["json"]:
        json.dump({"runs": results}, out, indent=2)
        out.write("\n")
    if options["plot"]:
        plot(results, options["plot"])
    return results
