"""``python -m genesis_core info | demo | bench``."""
from __future__ import annotations

import sys


def _usage() -> int:
    print("usage: python -m genesis_core {info,demo,bench} [options]\n"
          "  info   backends table: name, available or why not, version, the kernel it really runs\n"
          "  demo   the spec's interface demos, then the backends table\n"
          "  bench  attention/executor benchmarks (python -m genesis_core bench --help)")
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        return _usage() if not argv else (_usage() and 0)
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from .info import print_backends_table

        print_backends_table()
        return 0
    if cmd == "demo":
        from .examples.interfaces_demo import main as demo_main

        return demo_main()
    if cmd == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return _usage()


if __name__ == "__main__":
    sys.exit(main())
