"""Mistakes with `medfed server` / `medfed client` end in one line and exit 2, before anything starts."""

import pytest

from medfed.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["server", "--certs", "{tmp}/nowhere", "--run-dir", "{tmp}/run"], "does not exist; create it with 'medfed certs"),
    (["server", "--run-dir", "{tmp}/run"], "needs --certs DIR"),
    (["server", "--resume"], "--resume needs --run-dir"),
    (["server", "--insecure", "--address", "nonsense", "--run-dir", "{tmp}/run"], "HOST:PORT"),
    (["client", "--server", "h:1", "--site", "a", "--data", "{tmp}/nodata", "--certs", "{tmp}"], "does not exist"),
    (["client", "--server", "h:1", "--site", "a/b", "--data", "{tmp}", "--certs", "{tmp}"], "Site name 'a/b'"),
    (["client", "--server", "h", "--site", "a", "--data", "{tmp}", "--certs", "{tmp}"], "HOST:PORT"),
])
def test_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    # Execute
    code = main([arg.format(tmp=tmp_path) for arg in argv])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err
