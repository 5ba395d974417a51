"""The nightly refresh entrypoint for `ray job submit`.

    ray job submit --working-dir . -- python jobs/refresh.py --root s3://bucket/coincide \\
        --input s3://bucket/corpus/ --image-root s3://bucket/corpus/ --model s3://bucket/models/tinyllava \\
        --config job.yaml

Each night writes a complete, self-contained run under <root>/runs/<date> (today in UTC unless
--date is given), reusing the vectors of every unchanged record from the newest usable run
dated before it and diffing the selection against that run. A run that is gone, cut short or
marked in progress is passed over in one line. latest.json is updated last, only when the
run finished and only forward: a backfill of an older date is written but leaves latest.json
at the newer night, and says so. A failed night leaves latest.json as it was, and the same
command resumes tonight's run. Every other flag is passed to `coincide-ray run`.
"""

from __future__ import annotations

import argparse
import datetime
import sys

from coincide_ray import io, nightly
from coincide_ray.cli import main as coincide_ray


def say(line: str) -> None:
    print(f"[coincide-ray] {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--root", required=True, metavar="URI", help="folder or s3:// prefix holding runs/ and latest.json")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                        help="name of tonight's run, YYYY-MM-DD (default: today's UTC date)")
    args, passed = parser.parse_known_args(argv)
    try:
        date = nightly.check_date(args.date)
    except ValueError as error:
        print(f"refresh: error: {error}", file=sys.stderr)
        return 2
    output = io.join(args.root, nightly.RUNS, date)
    previous = nightly.choose_previous(args.root, date, say)
    code = coincide_ray(["run", *passed, "--output", output, *(["--previous", previous] if previous else [])])
    if code == 0:
        nightly.finish_night(args.root, date, output, previous, say)
    return code


if __name__ == "__main__":
    sys.exit(main())
