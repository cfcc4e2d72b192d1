"""`lmcompress clean INPUT... --out DIR`: the cleaner on the command line.

Wired into the main CLI with `add_parser(subparsers)` (it sets `func=main` on the parsed args); also runs
alone as `python -m lmcompress.data.cleaning.cli INPUT... --out DIR`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lmcompress.data.cleaning.config import load_clean_config

DESCRIPTION = """\
Clean a pre-training corpus: Unicode/whitespace normalization, boilerplate/short/garbage/repeated line
filters, Gopher-style document filters, exact and MinHash near-duplicate removal. Streams the input with
flat memory. Writes DIR/corpus.jsonl (or .parquet) and DIR/clean_report.{json,md} (what each filter
removed, with examples). Filter settings: --config YAML with the fields of CleanConfig, e.g.
  near_dedup: {threshold: 0.8}
  lines: {short: {enabled: false}}
  documents: {length: {min_words: 100}}
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("clean", help="clean a pre-training corpus (filters, de-duplication, report)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt (one document per file), .jsonl or .parquet files, or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier cleaner output in --out")
    p.add_argument("--config", metavar="YAML", help="filter settings (fields of CleanConfig)")
    p.add_argument("--num-proc", type=int, metavar="N", help="worker processes (default: config, else 1)")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="output format (default jsonl)")
    p.add_argument("--text-column", metavar="NAME", help="text field of jsonl/parquet records (default text)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from lmcompress.data.cleaning.pipeline import clean_files  # lazy: datasketch/scipy (~1 s) only to run

    cfg = load_clean_config(args.config, num_proc=args.num_proc, output_format=args.format,
                            text_column=args.text_column)
    report = clean_files(args.inputs, args.out, cfg, overwrite=args.overwrite)
    s = report.stats
    print(f"{s.documents_in:,} documents in, {s.documents_out:,} out; "
          f"{s.bytes_in / 1e6:.1f} MB in, {s.bytes_out / 1e6:.1f} MB out; "
          f"{report.seconds:.1f} s ({report.mb_per_s:.2f} MB/s, {report.num_proc} process(es))")
    for row in report.rows():
        print(f"  {row['filter']:<22} docs {row['documents_removed']:>8,}  lines {row['lines_removed']:>9,}  "
              f"bytes {row['bytes_removed']:>12,}")
    print(f"wrote {report.output} and {args.out}/clean_report.md")
    return 0


if __name__ == "__main__":
    from lmcompress.core.errors import LmcompressError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m lmcompress.data.cleaning.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        sys.exit(main(parser.parse_args(["clean", *sys.argv[1:]])))
    except LmcompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
