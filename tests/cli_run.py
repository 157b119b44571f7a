"""The command line as the tests call it: in this process, with pytest's captured output."""

from kvlib import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m kvlib ARGV`, run in this process."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr): what the tests of refusals read."""
    code, _, err = run_cli(capsys, *argv)
    return code, err
