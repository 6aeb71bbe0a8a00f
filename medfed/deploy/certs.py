"""Certificates and site keys for a deployed federation, made with ``cryptography``.

``medfed certs --out DIR --server-host HOST --sites A,B`` writes::

    DIR/
      ca.crt               the federation's certificate authority (public; every site gets it)
      ca.key               its private key (0600; keep it offline, it signs server certificates)
      server.crt           the SuperLink's TLS certificate, for HOST, localhost and 127.0.0.1
      server.key           its private key (0600; stays on the server)
      trusted_sites.txt    one "<OpenSSH public key> <site name>" line per site: the
                           SuperNodes the server lets in
      sites/A/             the folder to hand to site A:
        ca.crt             a copy of the CA certificate (to check the server)
        site.key           the site's private key (0600; never leaves the site)
        site.pub           its public key and name, as in trusted_sites.txt (checked
                           against site.key and --site by medfed client)

TLS keys are ECDSA P-256; site keys ECDSA P-384 in OpenSSH format, which is what Flower's
SuperNode authentication reads (``--auth-supernode-private-key``; it rejects ed25519).
Everything is made in a working folder inside DIR first, then swapped in (old entries
moved aside, new ones moved in, by renames), so a failure or Ctrl-C at any point leaves
the old files as they were, never a mix of old and new keys; a process killed during
the swap leaves its working folders, which the next run names. An existing DIR is
replaced only with ``force``, and then as a whole: the folders of sites no longer
listed go with it. Private keys are created with mode 0600 from
the start (no window in which they are world-readable).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed._io import check_output_folder, write_bytes_atomic
from medfed.errors import MedfedError, MedfedWarning

__all__ = [
    "CA_CERT",
    "CertsError",
    "ServerCerts",
    "SiteCerts",
    "TRUSTED_SITES",
    "make_certs",
    "read_trusted_sites",
    "server_certs",
    "site_certs",
    "validate_site_name",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
TRUSTED_SITES = "trusted_sites.txt"
SITES_DIR = "sites"
SITE_KEY = "site.key"
SITE_PUB = "site.pub"

#: Validity of the CA and server certificates.
VALIDITY_DAYS = 825
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


#: What ``make_certs`` writes at the top of its folder (swapped as a whole with ``force``).
_TOP_LEVEL = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TRUSTED_SITES, SITES_DIR)
#: Prefix of its working folders inside the output folder (new files; the old ones, while swapping).
_LEFTOVER = ".medfed-certs-"


class CertsError(MedfedError):
    """A certificate folder is missing, incomplete or would be overwritten, or a name is invalid."""


def validate_site_name(name: str) -> str:
    """Return ``name`` if it can name a site (a safe file name and Flower node name), else raise."""
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
        raise CertsError(
            f"Site name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name


def make_certs(
    out: str | Path, server_host: str, sites: list[str], *, force: bool = False, stdout=None,
) -> list[Path]:
    """Write a CA, the server certificate and one key pair per site into ``out``.

    All files are first written to a working folder inside ``out``; then the old files are
    moved aside and the new ones moved in, entry by entry (renames in one folder: no
    write access to ``out``'s parent is needed, and ``out`` may be a mount point or the
    current folder). On any error (or Ctrl-C) the old files are put back and the new ones
    removed.

    Parameters
    ----------
    out : str or Path
        Folder to write (created if missing; an existing empty folder is used).
    server_host : str
        DNS name or IP address the sites use to reach the server; it goes into the
        server certificate's subject alternative names with ``localhost`` and ``127.0.0.1``.
    sites : list of str
        Site names, unique (see :func:`validate_site_name`).
    force : bool
        Replace an existing certificate folder as a whole, including the folders of
        sites that are no longer listed. Without it, a folder that holds any file is
        an error and nothing is written.
    stdout : file, optional
        Where to say which old site folders ``force`` replaced or removed (default
        ``sys.stdout``).

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    CertsError
        Bad host or site names, files that exist without ``force``,
        a file in ``out`` that ``medfed certs`` does not write, or a write that failed.
    medfed._io.OutputFolderError
        ``out`` is a file, lies under one, or cannot be written.
    """
    given = Path(out).expanduser()
    host = _validate_host(server_host)
    if not sites:
        raise CertsError("Give at least one site name (--sites NAME[,NAME...]).")
    for name in sites:
        validate_site_name(name)
    # Each site gets the folder sites/NAME: names that differ only in case are one folder
    # on a case-insensitive file system (macOS, Windows).
    folded = [name.casefold() for name in sites]
    duplicates = sorted({name for name in sites if folded.count(name.casefold()) > 1})
    if duplicates:
        raise CertsError(f"Site names must be unique, ignoring case; {', '.join(duplicates)} appear more than once.")

    check_output_folder(given, "--out", results=False)
    # A link to the real folder stays a link: the folder it points to gets the new files.
    folder = given.resolve()
    old = _files_in(folder, given) if folder.exists() else []
    leftover = next((rel.split("/")[0] for rel in old if rel.startswith(_LEFTOVER)), None)
    if leftover is not None:
        what = ("the files it replaced, private keys included: restore them from it or delete it"
                if leftover.startswith(f"{_LEFTOVER}old-") else "files it had not finished: delete it")
        raise CertsError(f"{given} holds {leftover}, left by an interrupted 'medfed certs' with {what}; then run again.")
    foreign = [rel for rel in old if not _written_by_us(rel)]
    if foreign:
        raise CertsError(
            f"{given} holds {foreign[0]}, which 'medfed certs' does not write; move it out of the folder, "
            "or give another --out folder."
        )
    targets = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TRUSTED_SITES]
    for name in sites:
        targets += [f"{SITES_DIR}/{name}/{CA_CERT}", f"{SITES_DIR}/{name}/{SITE_KEY}", f"{SITES_DIR}/{name}/{SITE_PUB}"]
    existing = [t for t in targets if t in old] + [rel for rel in old if rel not in targets]
    if existing and not force:
        raise CertsError(
            f"{given} already holds {existing[0]}" + (f" and {len(existing) - 1} more file(s)" if len(existing) > 1 else "")
            + "; give another --out folder, or --force to replace them (sites then need their new keys)."
        )

    created = [path for path in (folder, *folder.parents) if not path.exists()]  # nearest first
    token = secrets.token_hex(6)
    staging, aside = folder / f"{_LEFTOVER}new-{token}", folder / f"{_LEFTOVER}old-{token}"
    moved: list[str] = []  # old entries moved aside
    placed: list[str] = []  # new entries moved in
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
        written = _write_certs(staging, host, server_host, sites)
        aside.mkdir(mode=0o700)
        for name in _TOP_LEVEL:
            if os.path.lexists(folder / name):
                os.rename(folder / name, aside / name)
                moved.append(name)
        for name in _TOP_LEVEL:
            if os.path.lexists(staging / name):
                os.rename(staging / name, folder / name)
                placed.append(name)
    except BaseException as err:
        for name in placed:
            _remove(folder / name)
        for name in moved:
            os.rename(aside / name, folder / name)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
        if isinstance(err, OSError):
            raise CertsError(
                f"Could not write the certificates to {given} ({_os_reason(err)}); nothing was changed."
            ) from None
        raise
    _sync_folder(folder)
    staging.rmdir()
    try:
        shutil.rmtree(aside)
    except OSError as err:
        raise CertsError(
            f"Wrote the new certificates to {given}, but could not delete the old files, moved to {aside} "
            f"({_os_reason(err)}); delete it yourself, it holds the old private keys."
        ) from None

    old_sites = {rel.split("/")[1] for rel in old if rel.startswith(f"{SITES_DIR}/")}
    removed = sorted(old_sites - set(sites))
    replaced = [name for name in sites if name in old_sites]
    if removed:
        print(f"medfed certs: removed the old folder(s) of {', '.join(removed)} from {given / SITES_DIR} "
              "(not in --sites; the server no longer trusts them)", file=stdout)
    if replaced:
        print(f"medfed certs: replaced the old folder(s) of {', '.join(replaced)} in {given / SITES_DIR} "
              "(their old keys no longer work)", file=stdout)
    return [given / rel for rel in written]


def _write_certs(folder: Path, host: x509.GeneralName, server_host: str, sites: list[str]) -> list[str]:
    """Make the keys and certificates and write them into ``folder``; return the files, relative to it."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medfed federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_host)])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now)
        .add_extension(x509.SubjectAlternativeName(_alt_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    written = [
        _write(folder, CA_CERT, ca_pem, private=False),
        _write(folder, CA_KEY, _pem_key(ca_key), private=True),
        _write(folder, SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False),
        _write(folder, SERVER_KEY, _pem_key(server_key), private=True),
    ]
    trusted = []
    for name in sites:
        site_key = ec.generate_private_key(ec.SECP384R1())
        public = site_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
        site = f"{SITES_DIR}/{name}"
        written += [
            _write(folder, f"{site}/{CA_CERT}", ca_pem, private=False),
            _write(folder, f"{site}/{SITE_KEY}", site_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ), private=True),
            _write(folder, f"{site}/{SITE_PUB}", f"{public} {name}\n".encode("ascii"), private=False),
        ]
        trusted.append(f"{public} {name}")
    written.append(_write(folder, TRUSTED_SITES, ("\n".join(trusted) + "\n").encode("ascii"), private=False))
    return written


def _files_in(folder: Path, given: Path) -> list[str]:
    """Everything but folders under ``folder`` (links included), as sorted relative paths."""
    def fail(err: OSError) -> None:
        raise CertsError(f"Cannot read {err.filename} in --out {given} ({_os_reason(err)}).")

    files = []
    for root, dirs, names in os.walk(folder, onerror=fail):
        base = Path(root)
        names += [name for name in dirs if (base / name).is_symlink()]  # os.walk does not enter them
        files += [(base / name).relative_to(folder).as_posix() for name in names]
    return sorted(files)


def _written_by_us(rel: str) -> bool:
    """Whether ``rel`` is a file 'medfed certs' writes (or the temporary file of an interrupted write)."""
    parts = rel.split("/")
    if len(parts) == 1:
        names = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TRUSTED_SITES)
    elif len(parts) == 3 and parts[0] == SITES_DIR:
        names = (CA_CERT, SITE_KEY, SITE_PUB)
    else:
        return False
    leftover = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", parts[-1])
    return parts[-1] in names or (leftover is not None and leftover.group(1) in names)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _os_reason(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else _reason(err)


def _sync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable where the system allows it (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ServerCerts:
    """What the server needs from a certificate folder (absolute paths)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    trusted_sites: dict[str, str]  # site name -> OpenSSH public key line (without the name)


@dataclass(frozen=True)
class SiteCerts:
    """What one site needs: the CA to check the server and its own private key."""

    ca_cert: Path
    site_key: Path


def server_certs(folder: str | Path) -> ServerCerts:
    """Find the server's files in a ``medfed certs`` folder, or raise one clear :class:`CertsError`.

    The certificates and the key are read here, so that a damaged or mismatched file is
    named now rather than reported by the SuperLink as an OpenSSL error.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise CertsError(f"Certificate folder {folder} does not exist; create it with 'medfed certs --out {folder} ...'.")
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY, TRUSTED_SITES):
        if not (folder / name).is_file():
            raise CertsError(f"Certificate folder {folder} has no {name}; is it the folder 'medfed certs' wrote?")
    redo = f"re-run 'medfed certs --out {folder} ... --force' (sites then need their new folders)"
    ca = _load_cert(folder / CA_CERT, redo)
    cert = _load_cert(folder / SERVER_CERT, redo)
    key = _load_key(folder / SERVER_KEY, serialization.load_pem_private_key, "PEM", redo)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CertsError(f"{folder / SERVER_KEY} is not the key of {folder / SERVER_CERT}; {redo}.")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertsError(f"{folder / SERVER_CERT} is not signed by {folder / CA_CERT}; {redo}.") from None
    for name, certificate in ((CA_CERT, ca), (SERVER_CERT, cert)):
        _check_validity(folder / name, certificate, redo)
    return ServerCerts(
        ca_cert=folder / CA_CERT, server_cert=folder / SERVER_CERT, server_key=folder / SERVER_KEY,
        trusted_sites=read_trusted_sites(folder / TRUSTED_SITES),
    )


class CertsWarning(MedfedWarning):
    """A certificate folder that works but exposes a key."""


#: Days before expiry from which the server warns at every start.
EXPIRY_WARNING_DAYS = 30


def _check_validity(path: Path, certificate: x509.Certificate, redo: str) -> None:
    """Raise for a certificate outside its validity period; warn in its last days.

    The SuperLink would otherwise start with it and fail every TLS handshake (with a
    traceback where medfed registers the sites' keys).
    """
    now = dt.datetime.now(dt.timezone.utc)
    until = certificate.not_valid_after_utc
    if now > until:
        raise CertsError(f"{path} expired on {until:%Y-%m-%d}; {redo}.")
    if now < certificate.not_valid_before_utc:
        raise CertsError(f"{path} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                         "(is this machine's clock right?).")
    if until - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.warn(f"{path} expires on {until:%Y-%m-%d}; before then, {redo}.", stacklevel=3)


def site_certs(folder: str | Path, site: str) -> SiteCerts:
    """Find one site's files: ``folder`` is the site's own folder or the whole ``medfed certs`` folder.

    ``site.key`` is read here (a damaged key is named now, not after minutes of
    retries) and must be the key of ``site``: ``site.pub`` names the site it was made for.
    """
    validate_site_name(site)
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise CertsError(f"Certificate folder {folder} does not exist; copy the site's folder from 'medfed certs' there.")
    for candidate in (folder, folder / SITES_DIR / site):
        if (candidate / SITE_KEY).is_file():
            for name in (CA_CERT, SITE_PUB):
                if not (candidate / name).is_file():
                    raise CertsError(f"{candidate} has {SITE_KEY} but no {name}; copy the whole site folder.")
            _check_site_key(candidate, site)
            _warn_if_exposed(candidate, site, whole_folder=candidate != folder)
            return SiteCerts(ca_cert=candidate / CA_CERT, site_key=candidate / SITE_KEY)
    raise CertsError(
        f"No key for site {site!r} in {folder}: expected {SITE_KEY} there or in {SITES_DIR}/{site}/ "
        "(the folder 'medfed certs' wrote for this site)."
    )


def _warn_if_exposed(folder: Path, site: str, whole_folder: bool) -> None:
    """Warn when the site's key can be read by others, or was found in a whole ``medfed
    certs`` folder that holds the CA's key.

    Whoever reads ``site.key`` can join the study as ``site``; a site machine that holds
    the whole folder also holds ``ca.key`` and every other site's key. (A site folder
    still inside the whole one, as in a test on one machine, is not warned about.)
    """
    mode = (folder / SITE_KEY).stat().st_mode & 0o777
    if mode & 0o077:
        warnings.warn(f"{folder / SITE_KEY} can be read by other users of this machine (mode {mode:o}); "
                      f"chmod 600 it: whoever reads it can join the study as site {site}.", CertsWarning, stacklevel=3)
    top = folder.parent.parent if whole_folder else folder
    if (top / CA_KEY).is_file():
        warnings.warn(f"{top} holds the CA's private key ({CA_KEY}) and every site's key: copy only {SITES_DIR}/{site} "
                      f"to site {site}, and keep the rest on the server.", CertsWarning, stacklevel=3)


def _check_site_key(folder: Path, site: str) -> None:
    """Raise unless ``folder/site.key`` is an EC key that ``folder/site.pub`` assigns to ``site``."""
    again = f"copy the folder 'medfed certs' wrote for site {site!r} again"
    parts = (folder / SITE_PUB).read_text(encoding="utf-8", errors="replace").split()
    if len(parts) != 3:
        raise CertsError(f"{folder / SITE_PUB} must read '<key type> <base64 key> <site name>'; {again}.")
    if parts[2] != site:
        raise CertsError(
            f"{folder} holds the key of site {parts[2]!r}, not of site {site!r}: give --site {parts[2]}, "
            f"or --certs with the folder of site {site!r}."
        )
    key = _load_key(folder / SITE_KEY, serialization.load_ssh_private_key, "OpenSSH", again)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{folder / SITE_KEY} must be an ECDSA key (Flower rejects others); {again}.")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if public.decode("ascii") != " ".join(parts[:2]):
        raise CertsError(f"{folder / SITE_KEY} is not the key of {folder / SITE_PUB}; {again}.")


def _load_key(path: Path, load, kind: str, advice: str):  # noqa: ANN001, ANN202 - a cryptography loader and key
    try:
        return load(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertsError(f"{path} is not a readable {kind} private key ({_reason(err)}); {advice}.") from None


def _load_cert(path: Path, redo: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertsError(f"{path} is not a readable PEM certificate ({_reason(err)}); {redo}.") from None


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _reason(err: Exception) -> str:
    return " ".join(str(err).split()).split(". ")[0][:120] or type(err).__name__


def read_trusted_sites(path: str | Path) -> dict[str, str]:
    """Read ``trusted_sites.txt``: site name -> OpenSSH public key (``"<type> <base64>"``).

    Blank lines and ``#`` comments are skipped. Each key must be a NIST-curve EC key,
    which is what Flower accepts for SuperNode authentication.
    """
    path = Path(path)
    sites: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise CertsError(f"{path} line {number} must read '<key type> <base64 key> <site name>'.")
        key_text, name = " ".join(parts[:2]), parts[2]
        validate_site_name(name)
        try:
            key = serialization.load_ssh_public_key(key_text.encode("ascii"))
        except (ValueError, TypeError) as err:
            raise CertsError(f"{path} line {number}: the key of site {name!r} cannot be read ({err}).") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CertsError(f"{path} line {number}: site {name!r} must have an ECDSA key (Flower rejects others).")
        if name in sites:
            raise CertsError(f"{path} lists site {name!r} twice; keep one line per site.")
        sites[name] = key_text
    if not sites:
        raise CertsError(f"{path} lists no site; run 'medfed certs' with --sites.")
    return sites


def _validate_host(host: str) -> x509.GeneralName:
    if not isinstance(host, str) or not host.strip():
        raise CertsError("--server-host must be the DNS name or IP address the sites use to reach the server.")
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", host):
        raise CertsError(f"--server-host {host!r} is neither an IP address nor a DNS name (no scheme, no port).")
    return x509.DNSName(host)


def _alt_names(host: x509.GeneralName) -> list[x509.GeneralName]:
    # The SuperLink's own helpers (SuperExec, the flwr CLI) reach it on 127.0.0.1.
    names: list[x509.GeneralName] = [host]
    for extra in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        if extra not in names:
            names.append(extra)
    return names


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(folder: Path, rel: str, data: bytes, *, private: bool) -> str:
    """Write ``folder/rel`` atomically with the mode set before the data, so a private key
    is never readable by others; return ``rel``."""
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, mode=0o600 if private else 0o644)
    return rel
