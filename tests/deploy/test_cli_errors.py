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


def test_a_server_on_a_port_in_use_is_refused_before_it_starts(tmp_path, capsys):
    # Another program (or another study's server) listens on the port: waiting for the
    # port to answer took it for this server's SuperLink.
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code = main(["server", "--insecure", "--address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path / "run"),
                     "--set", "federation.num_sites=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].endswith(f"Port {port} on 127.0.0.1 is in use (Address already in use), by another program or "
                            "another medfed server; stop it, or give this server another --address.")
