"""medfed certs output, certificate lookups, addresses and the site-data check (no network)."""

import numpy as np
import pytest
from cryptography import x509

from medfed.client.site_data import SiteDataError
from medfed.deploy.certs import CertsError, make_certs, read_trusted_sites, server_certs, site_certs
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
    # A site finds its files from its own folder or from the whole folder.
    assert site_certs(tmp_path / "sites" / "north", "north") == site_certs(tmp_path, "north")


def test_keys_are_private_and_certificates_public(tmp_path):
    make_certs(tmp_path, "fl.example.org", ["a"])
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes["ca.key"] == modes["server.key"] == modes["sites/a/site.key"] == 0o600
    assert modes["ca.crt"] == modes["server.crt"] == modes["sites/a/site.pub"] == 0o644


@pytest.mark.parametrize("host, sites, match", [
    ("https://x:1", ["a"], "neither an IP address nor a DNS name"),
    ("x.org", ["a", "a"], "appears more than once"),
    ("x.org", ["bad/name"], "must be 1-64 letters"),
])
def test_bad_names_are_one_line_errors(tmp_path, host, sites, match):
    with pytest.raises(CertsError, match=match):
        make_certs(tmp_path, host, sites)
    assert not any(tmp_path.iterdir())  # nothing written


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


@pytest.mark.parametrize("text", ["9092", "host:", "host:99999", "a:b:c:1"])
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


def test_site_data_check_accepts_an_image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    rows = ["filename,label,split"]
    for i, split in enumerate(["train", "train", "test"]):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{i % 2},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert check_site_data(tmp_path) == "train 2, test 1 images"


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "neither a MedMNIST .npz file nor labels.csv"),
    (lambda p: _npz(p, n_train=0), "no training images"),
])
def test_bad_site_folders_fail_before_connecting(tmp_path, setup, match):
    folder = tmp_path / "site"
    setup(folder)
    with pytest.raises(SiteDataError, match=match):
        check_site_data(folder)
