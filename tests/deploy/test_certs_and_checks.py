"""medfed certs output, certificate lookups, addresses and the site-data check (no network)."""

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509

from medfed.client.site_data import SiteDataError
from medfed.deploy.certs import CertsError, CertsWarning, make_certs, read_trusted_sites, server_certs, site_certs
from medfed.deploy.superlink import DeployError, parse_address
from medfed.deploy.supernode import check_site_data


def test_server_certificate_names_the_host_and_loopback(tmp_path):
    # Prepare / Execute
    make_certs(tmp_path, "fl.example.org", ["a"])
    # Assert
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_site_keys_are_p384_and_trusted_by_name(tmp_path):
    # Prepare / Execute
    make_certs(tmp_path, "10.0.0.5", ["north", "south"])
    trusted = read_trusted_sites(tmp_path / "trusted_sites.txt")
    # Assert
    assert list(trusted) == ["north", "south"]
    assert all(key.startswith("ecdsa-sha2-nistp384 ") for key in trusted.values())
    assert server_certs(tmp_path).trusted_sites == trusted
    # A site finds its files from its own folder or from the whole folder (which it is
    # told not to keep: it holds the CA's key).
    with pytest.warns(CertsWarning, match=r"holds the CA's private key \(ca.key\).*copy only sites/north"):
        whole = site_certs(tmp_path, "north")
    assert site_certs(tmp_path / "sites" / "north", "north") == whole


def test_a_site_key_others_can_read_is_warned_about_and_a_private_copy_is_not(tmp_path):
    import shutil
    import warnings

    make_certs(tmp_path / "certs", "10.0.0.5", ["north"])
    copy = shutil.copytree(tmp_path / "certs" / "sites" / "north", tmp_path / "site")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the site's own folder, mode 0600: nothing to say
        site_certs(copy, "north")
    (copy / "site.key").chmod(0o644)
    with pytest.warns(CertsWarning, match=r"site.key can be read by other users of this machine \(mode 644\); "
                                          r"chmod 600 it"):
        site_certs(copy, "north")


def test_keys_are_private_and_certificates_public(tmp_path):
    make_certs(tmp_path, "fl.example.org", ["a"])
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes["ca.key"] == modes["server.key"] == modes["sites/a/site.key"] == 0o600
    assert modes["ca.crt"] == modes["server.crt"] == modes["sites/a/site.pub"] == 0o644


@pytest.mark.parametrize("host, sites, match", [
    ("https://x:1", ["a"], "neither an IP address nor a DNS name"),
    ("x.org", ["a", "a"], "appear more than once"),
    ("x.org", ["Alpha", "alpha"], r"unique, ignoring case; Alpha, alpha appear more than once"),
    ("x.org", ["bad/name"], "must be 1-64 letters"),
])
def test_bad_names_are_one_line_errors(tmp_path, host, sites, match):
    with pytest.raises(CertsError, match=match):
        make_certs(tmp_path, host, sites)
    assert not any(tmp_path.iterdir())  # nothing written


def _contents(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in folder.rglob("*") if p.is_file()}


def test_force_replaces_the_whole_folder_and_names_the_sites_it_drops(tmp_path, capsys):
    # Prepare
    out = tmp_path / "c1"
    make_certs(out, "fl.example.org", ["hospital-a", "hospital-b"])
    # Execute
    make_certs(out, "fl.example.org", ["hospital-c"], force=True)
    # Assert: no site folder is left with the old CA, and the dropped ones are named.
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["hospital-c"]
    assert (out / "sites" / "hospital-c" / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()
    printed = capsys.readouterr().out
    assert "removed the old folder(s) of hospital-a, hospital-b" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1"]  # nothing left beside it


def test_no_force_refuses_and_changes_nothing(tmp_path):
    make_certs(tmp_path / "c", "x.org", ["a"])
    before = _contents(tmp_path / "c")
    with pytest.raises(CertsError, match="already holds ca.crt and .* more file.*--force to replace them"):
        make_certs(tmp_path / "c", "x.org", ["b"])
    assert _contents(tmp_path / "c") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("fail, raised", [
    (OSError(28, "No space left on device", "site.key"), CertsError),
    (KeyboardInterrupt(), KeyboardInterrupt),
], ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("at", ["writing", "swapping"])
def test_a_failure_midway_leaves_the_old_folder_whole(tmp_path, monkeypatch, fail, raised, at):
    # Prepare: a complete folder, then a --force run that fails while writing the sites'
    # keys, or when the new folder is renamed into place.
    import medfed.deploy.certs as certs

    out = tmp_path / "c"
    make_certs(out, "x.org", ["a", "b"])
    before = _contents(out)
    if at == "writing":
        write = certs.write_bytes_atomic

        def failing_write(path, data, mode=None):
            if path.as_posix().endswith("sites/c/site.key"):
                raise fail
            return write(path, data, mode)

        monkeypatch.setattr(certs, "write_bytes_atomic", failing_write)
    else:
        rename = os.rename

        def failing_rename(src, dst):  # the last new entry, after the others were swapped in
            if ".medfed-certs-new-" in str(src) and os.path.basename(src) == "sites":
                raise fail
            return rename(src, dst)

        monkeypatch.setattr(os, "rename", failing_rename)
    # Execute
    with pytest.raises(raised) as err:
        make_certs(out, "x.org", ["a", "c"], force=True)
    # Assert: the old folder, complete and unchanged, and no temporary folder beside it.
    if raised is CertsError:
        assert "No space left on device" in str(err.value) and "nothing was changed" in str(err.value)
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no working folder left


def test_force_on_the_current_folder_keeps_the_folder_itself(tmp_path, monkeypatch):
    # The folder is never renamed (the shell standing in it, a mount point, a parent
    # without write access): only its entries are swapped.
    out = tmp_path / "c"
    make_certs(out, "x.org", ["a"])
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    make_certs(".", "x.org", ["b"], force=True)
    assert out.stat().st_ino == inode and os.getcwd() == str(out)
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["b"]


@pytest.mark.parametrize(("leftover", "expected"), [
    (".medfed-certs-old-0123", "with the files it replaced, private keys included: restore them from it or delete it"),
    (".medfed-certs-new-0123", "with files it had not finished: delete it"),
])
def test_a_killed_runs_working_folder_is_named_not_ignored(tmp_path, leftover, expected):
    make_certs(tmp_path / "c", "x.org", ["a"])
    (tmp_path / "c" / leftover).mkdir()
    (tmp_path / "c" / leftover / "ca.key").write_text("an old private key\n")
    with pytest.raises(CertsError, match=f"holds {leftover}, left by an interrupted 'medfed certs' {expected}"):
        make_certs(tmp_path / "c", "x.org", ["a"], force=True)


def test_force_replaces_a_folder_in_the_way_of_a_key(tmp_path):
    # Prepare: a folder where site a's key goes.
    (tmp_path / "c" / "sites" / "a" / "site.key").mkdir(parents=True)
    # Execute
    make_certs(tmp_path / "c", "x.org", ["a"], force=True)
    # Assert
    assert site_certs(tmp_path / "c", "a").site_key.is_file()


def test_force_keeps_a_folder_with_files_it_did_not_write(tmp_path):
    make_certs(tmp_path / "c", "x.org", ["a"])
    (tmp_path / "c" / "notes.txt").write_text("keep me\n")
    before = _contents(tmp_path / "c")
    with pytest.raises(CertsError, match="holds notes.txt, which 'medfed certs' does not write; move it out"):
        make_certs(tmp_path / "c", "x.org", ["a"], force=True)
    assert _contents(tmp_path / "c") == before


def test_force_keeps_the_folder_mode(tmp_path):
    (tmp_path / "c").mkdir(mode=0o700)
    make_certs(tmp_path / "c", "x.org", ["a"])
    make_certs(tmp_path / "c", "x.org", ["a"], force=True)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_out_that_is_a_file_is_one_line(tmp_path, capsys, out):
    from medfed.cli import main

    # Prepare
    (tmp_path / "afile").write_text("data\n")
    # Execute
    code = main(["certs", "--out", str(tmp_path / out), "--server-host", "x.org", "--sites", "a"])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'afile'} is a file; give a folder (--out)." in err
    assert (tmp_path / "afile").read_text() == "data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_missing_certificate_files_name_the_file(tmp_path):
    make_certs(tmp_path, "x.org", ["a"])
    (tmp_path / "server.key").unlink()
    with pytest.raises(CertsError, match="has no server.key"):
        server_certs(tmp_path)
    with pytest.raises(CertsError, match="No key for site 'b'"):
        site_certs(tmp_path, "b")


@pytest.mark.parametrize("text, host, port", [("0.0.0.0:9092", "0.0.0.0", 9092), ("[::1]:80", "::1", 80)])
def test_addresses_parse(text, host, port):
    address = parse_address(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize("text", ["9092", "host:", "host:99999", "a:b:c:1", "https://host:9092"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(DeployError, match="HOST:PORT|IPv6"):
        parse_address(text)


def _npz(folder, n_train=4, n_test=2):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("val", 1), ("test", n_test)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(folder / "breastmnist.npz", **arrays)
    return folder


def test_site_data_check_accepts_a_medmnist_folder(tmp_path):
    assert check_site_data(_npz(tmp_path / "site")) == "train 4, val 1, test 2 images"


def test_a_folder_of_two_datasets_is_counted_per_file(tmp_path):
    # The counts were the largest split of any file: a folder with BreastMNIST and
    # PneumoniaMNIST announced PneumoniaMNIST's 3,882 training images for a BreastMNIST study.
    folder = _npz(tmp_path / "site")
    np.savez(folder / "pneumoniamnist.npz", **{
        f"{split}_{kind}": np.zeros((n, 28, 28) if kind == "images" else (n, 1), np.uint8)
        for split, n in (("train", 9), ("val", 3), ("test", 5)) for kind in ("images", "labels")})
    assert check_site_data(folder) == ("breastmnist.npz: train 4, val 1, test 2 images; "
                                       "pneumoniamnist.npz: train 9, val 3, test 5 images")


def test_site_data_check_accepts_an_image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    rows = ["filename,label,split"]
    for i, split in enumerate(["train", "train", "test"]):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{i % 2},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert check_site_data(tmp_path) == "train 2, test 1 images"
    # A .npz of the hospital's own next to labels.csv is not a MedMNIST file (it stopped the client).
    np.savez(tmp_path / "features.npz", embeddings=np.zeros((3, 4)))
    assert check_site_data(tmp_path) == "train 2, test 1 images"


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "neither a MedMNIST .npz file nor labels.csv"),
    (lambda p: _npz(p, n_train=0), "no training images"),
    (lambda p: p.write_text("a file"), r"is a file; give the site's data folder"),
])
def test_bad_site_folders_fail_before_connecting(tmp_path, setup, match):
    folder = tmp_path / "site"
    setup(folder)
    with pytest.raises(SiteDataError, match=match):
        check_site_data(folder)


def test_a_site_folder_of_another_site_is_refused(tmp_path):
    # Prepare
    make_certs(tmp_path, "x.org", ["hospital-a", "hospital-b"])
    renamed = tmp_path / "hospital-b-folder"
    (tmp_path / "sites" / "hospital-b").rename(renamed)
    # Execute / Assert: the name comes from site.pub, not from the folder's name.
    assert site_certs(renamed, "hospital-b").site_key == renamed / "site.key"
    with pytest.raises(CertsError, match="holds the key of site 'hospital-b', not of site 'hospital-a': give --site "
                                         "hospital-b, or --certs with the folder of site 'hospital-a'"):
        site_certs(renamed, "hospital-a")


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "site.key").write_text("garbage\n"), "site.key is not a readable OpenSSH private key"),
    (lambda d: (d / "site.pub").write_text((d.parent / "b" / "site.pub").read_text().replace(" b", " a")),
     "site.key is not the key of .*site.pub"),
    (lambda d: (d / "site.pub").write_text("ecdsa-sha2-nistp384 AAAA\n"), "site.pub must read"),
    (lambda d: (d / "site.pub").unlink(), "has site.key but no site.pub; copy the whole site folder"),
])
def test_a_damaged_site_folder_is_named_before_connecting(tmp_path, damage, match):
    # Prepare
    make_certs(tmp_path, "x.org", ["a", "b"])
    damage(tmp_path / "sites" / "a")
    # Execute / Assert
    with pytest.raises(CertsError, match=match):
        site_certs(tmp_path / "sites" / "a", "a")


@pytest.mark.parametrize("damage, match", [
    (lambda d, other: (d / "server.key").write_text("garbage\n"), "server.key is not a readable PEM private key"),
    (lambda d, other: (d / "server.crt").write_text("garbage\n"), "server.crt is not a readable PEM certificate"),
    (lambda d, other: (d / "ca.crt").write_bytes(b""), "ca.crt is not a readable PEM certificate"),
    (lambda d, other: (d / "server.key").write_bytes((other / "server.key").read_bytes()),
     "server.key is not the key of .*server.crt"),
    (lambda d, other: (d / "ca.crt").write_bytes((other / "ca.crt").read_bytes()),
     "server.crt is not signed by .*ca.crt"),
])
def test_damaged_server_certificates_are_named_before_starting(tmp_path, damage, match):
    # Prepare: the server's folder, and another 'medfed certs' folder to take files from.
    make_certs(tmp_path / "certs", "x.org", ["a"])
    make_certs(tmp_path / "other", "x.org", ["a"])
    damage(tmp_path / "certs", tmp_path / "other")
    # Execute / Assert
    with pytest.raises(CertsError, match=match + r".*re-run 'medfed certs --out .* --force'"):
        server_certs(tmp_path / "certs")


def test_a_device_the_site_lacks_stops_the_client_before_connecting(tmp_path):
    from medfed.client.task import DeviceError
    from medfed.deploy.supernode import run_client

    with pytest.raises(DeviceError, match="Device 'cuda:99' is not on this machine"):
        run_client(server="localhost:1", site="a", data=_npz(tmp_path / "site"), certs=None, insecure=True,
                   device="cuda:99")


def test_the_sites_supernode_keeps_flowers_files_in_its_state_folder_and_drops_old_app_copies(tmp_path, monkeypatch):
    # Flower installed every study's app in ~/.flwr/apps and never removed one.
    import io

    from medfed.deploy import supernode
    from medfed.deploy.supernode import run_client

    seen = {}
    monkeypatch.setattr(supernode, "_keep_running", lambda command, env, *rest: seen.update(env=env))
    home = tmp_path / "state" / "a" / "flower"
    apps = home / "apps"

    def app(name: str, files=("pyproject.toml",)) -> Path:
        (apps / name).mkdir(parents=True)
        for file in files:
            (apps / name / file).write_text("x")
        return apps / name

    app("medfed.medfed-simulation.0.1.0.777affaa")
    app("medfed.medfed-study.0.1.0.0f466981")
    kept = [app("medfed.medfed-study.0.1.0.1234abcd", ("pyproject.toml", "notes.txt")),  # not what medfed installs
            app("someone.else.1.0.0.0f466981")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pyproject.toml").write_text("x")
    (apps / "medfed.medfed-study.0.1.0.deadbeef").symlink_to(elsewhere)
    kept.append(apps / "medfed.medfed-study.0.1.0.deadbeef")
    # Execute
    run_client(server="localhost:1", site="a", data=_npz(tmp_path / "site"), certs=None, insecure=True,
               state_dir=tmp_path / "state", out=io.StringIO())
    # Assert
    assert seen["env"]["FLWR_HOME"] == str(home.resolve())
    assert seen["env"]["FLWR_TELEMETRY_ENABLED"] == "0"  # Flower's usage reports stay at the hospital
    assert seen["env"]["FLWR_DISABLE_UPDATE_CHECK"] == "1"  # and so does its daily update check
    assert sorted(apps.iterdir()) == sorted(kept) and (elsewhere / "pyproject.toml").is_file()


@pytest.mark.parametrize("path", ["/data/back\\slash", "C:\\sites\\north", "/data/tab\there", "/data/a b/ünï"])
def test_a_site_path_reaches_the_supernode_as_written(path):
    # A backslash made Flower's node config invalid TOML: the SuperNode failed 6 times in a row.
    from flwr.common.config import parse_config_args

    from medfed.deploy.supernode import _quoted

    parsed = parse_config_args([f'site-name="north" data-path="{_quoted(path)}" state-dir="{_quoted(path)}"'])

    assert parsed == {"site-name": "north", "data-path": path, "state-dir": path}


def test_an_expired_certificate_is_one_line_and_one_near_expiry_warns(tmp_path, monkeypatch):
    # Prepare: a certificate that expired two days ago; a certificate folder whose certificates expire in ten days.
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from medfed.deploy import certs as certs_module

    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old")])
    expired = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now - dt.timedelta(days=10))
               .not_valid_after(now - dt.timedelta(days=2)).sign(key, hashes.SHA256()))
    monkeypatch.setattr(certs_module, "VALIDITY_DAYS", 10)
    make_certs(tmp_path / "soon", "localhost", ["a"])
    # Execute / Assert: refused before the SuperLink starts (it failed every handshake, with a traceback).
    with pytest.raises(CertsError, match=r"^server\.crt expired on \d{4}-\d{2}-\d{2}; renew\.$"):
        certs_module._check_validity(Path("server.crt"), expired, "renew")
    with pytest.warns(UserWarning, match=r"expires on \d{4}-\d{2}-\d{2}; before then, re-run 'medfed certs"):
        server_certs(tmp_path / "soon")
