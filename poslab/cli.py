"""The ``poslab`` command line."""

from __future__ import annotations

import argparse
import sys

from poslab import pe as pe_lib

__all__ = ["main"]


def cmd_list(args: argparse.Namespace) -> int:
    """One line per encoding: name, sites, and the paper it implements."""
    rows = []
    for name in pe_lib.names():
        cls = pe_lib.get(name)
        sites = ",".join(sorted(s.value for s in cls.sites)) or "-"
        rows.append((name, sites, cls.paper))
    width = max(len(r[0]) for r in rows)
    swidth = max(len(r[1]) for r in rows)
    for name, sites, paper in rows:
        print(f"{name:<{width}}  {sites:<{swidth}}  {paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poslab", description="Position in Transformers: encodings and a lab.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list every positional encoding with its paper")
    p_list.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
