"""The ``kvcoord`` command installed by pip: the same command line as the
Rust ``kvcoord`` binary (``kvcoord serve``, ``kvcoord status``), run by
``kvcoord::cli::run`` inside this process."""

import os
import sys


def main() -> None:
    from . import _kvcoord

    code = _kvcoord._cli_main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Like the Rust binary: exit at once with the real code (the server's
    # copy-lane threads need no orderly join).
    os._exit(code)


if __name__ == "__main__":
    main()
