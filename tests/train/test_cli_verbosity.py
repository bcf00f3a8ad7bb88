"""The command line's log switches (-q, -v, --verbosity) and the TFDS warning it silences.

Its errors (one line, exit code 2, --debug): tests/test_bad_input.py.
"""

import logging

from saljax import cli


def test_verbosity_switch_and_silenced_tfds_warning(caplog):
    args = cli.build_parser().parse_args(["-q", "demo"])
    assert args.verbosity == "warning"
    assert cli.build_parser().parse_args(["demo", "-v"]).verbosity == "debug"
    assert cli.build_parser().parse_args(["--verbosity", "error", "demo"]).verbosity == "error"
    cli._setup_logging("warning")
    assert logging.getLogger("saljax").level == logging.WARNING
    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("Using custom data configuration: %s", "x")
        logging.getLogger("absl").warning("another warning")
    assert "custom data configuration" not in caplog.text and "another warning" in caplog.text
    cli._setup_logging("info")
