"""The SuperLink trusts exactly the keys of the current certs folder, across restarts of the server."""

from __future__ import annotations

import pytest

from medfed.deploy.certs import make_certs, server_certs
from medfed.deploy.processes import ProcessSet, free_port, wait_for_port
from medfed.deploy.superlink import Address, DeployError, _Control, new_superexec_secret, _superlink_command


def _registered(control: _Control) -> dict[str, bytes]:
    return {node.name: bytes(node.public_key) for node in control.nodes() if node.status != "unregistered"}


def _superlink(home, certs_dir, processes: ProcessSet) -> _Control:
    """A real SuperLink on the run folder's state database, as medfed server starts it."""
    tls = server_certs(certs_dir)
    listen = Address("127.0.0.1", free_port())
    new_superexec_secret(home)
    link = processes.start(_superlink_command(listen, home, tls), log=home / "superlink.log")
    if not wait_for_port(listen.host, listen.port, 60.0, alive=lambda: link.poll() is None):
        pytest.fail((home / "superlink.log").read_text()[-2000:])
    return _Control(listen, tls)


def test_removed_and_replaced_keys_are_withdrawn_when_the_server_starts_again(tmp_path):
    # Prepare: a run's SuperLink trusted alpha, beta and gamma; then the study removed beta
    # and gave alpha a new key (medfed certs --force), and the server is started again.
    home = tmp_path / "flower"
    home.mkdir()
    make_certs(tmp_path / "certs", "localhost", ["alpha", "beta", "gamma"])
    first_keys = server_certs(tmp_path / "certs").trusted_sites
    processes = ProcessSet()
    try:
        control = _superlink(home, tmp_path / "certs", processes)
        assert control.trust_exactly(first_keys) == []
        before = _registered(control)
        control.close()
        processes.stop()
        make_certs(tmp_path / "certs", "localhost", ["alpha", "gamma"], force=True)
        # gamma keeps its old key (as if its line of trusted_sites.txt had been kept).
        new_keys = {**server_certs(tmp_path / "certs").trusted_sites, "gamma": first_keys["gamma"]}

        # Execute
        processes = ProcessSet()
        control = _superlink(home, tmp_path / "certs", processes)
        withdrawn = control.trust_exactly(new_keys)
        after = _registered(control)
        again = control.trust_exactly(new_keys)
        # beta back with its old key, and alpha's old key renamed: refused before anything changes.
        for sites in ({**new_keys, "beta": first_keys["beta"]}, {"gamma": new_keys["gamma"], "delta": first_keys["alpha"]}):
            with pytest.raises(DeployError, match="Flower never registers a key twice"):
                control.trust_exactly(sites)
        unchanged = _registered(control)
        control.close()
    finally:
        processes.stop()

    # Assert: beta is gone, alpha has only its new key, gamma kept its registration.
    assert withdrawn == ["alpha", "beta"]
    assert sorted(after) == ["alpha", "gamma"]
    assert after["gamma"] == before["gamma"] and after["alpha"] != before["alpha"]
    assert again == []  # a second start with the same folder changes nothing
    assert unchanged == after


def test_the_server_says_once_when_a_site_with_an_untrusted_key_tries_to_join(tmp_path):
    # Flower refuses such a SuperNode and only writes it to superlink.log, every few seconds;
    # the coordinator saw "waiting for N site(s)" and nothing else.
    import base64
    import hashlib
    import io

    from medfed.deploy.superlink import _SuperLinkWatch, public_keys

    make_certs(tmp_path / "certs", "127.0.0.1", ["alpha", "mallory"])
    lines = {name: (tmp_path / "certs" / "sites" / name / "site.pub").read_text().strip()
             for name in ("alpha", "mallory")}
    keys = public_keys(lines)

    def refusal(pem: bytes) -> str:  # Flower's line, as superlink.log has it
        return ("ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public "
                f"key: {pem!r}, exception: No SuperNode found with the given public key.\n")

    log = tmp_path / "superlink.log"
    log.write_text(refusal(keys["mallory"]))  # before this server started: not this study's to report
    out = io.StringIO()
    watch = _SuperLinkWatch(None, out, {"alpha": keys["alpha"]}, tmp_path / "registered.json", superlink_log=log)
    # Execute
    with log.open("a") as handle:
        handle.write(refusal(keys["mallory"]) + refusal(keys["alpha"]) + refusal(keys["mallory"]))
    watch._say_unknown_keys()
    watch._say_unknown_keys()
    # Assert: said once, with the fingerprint 'ssh-keygen -lf site.pub' shows at the site
    blob = base64.b64decode(lines["mallory"].split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    said = out.getvalue().splitlines()
    assert len(said) == 1 and "a site whose key is not in trusted_sites.txt tried to join" in said[0]
    assert fingerprint in said[0]
