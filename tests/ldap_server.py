"""A real OpenLDAP ``slapd`` for tests and benchmarks: a temporary configuration and
database, listening on a free loopback port, run in the foreground and stopped at the end.

The Debian package ``slapd`` provides the binary, its modules and the standard schemas
(``make test`` installs it when missing). The database has the base ``dc=school,dc=test``
with ``ou=people`` and ``ou=groups``; the root account is ``cn=admin,dc=school,dc=test``.
A read-only service account ``cn=reader,dc=school,dc=test`` (what Darbaza binds with) may
read everything but passwords, as a school's directory administrator would set it up.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from ldap3 import ALL, MODIFY_REPLACE, Connection, Server

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = Path("/etc/ldap/schema")

BASE_DN = "dc=school,dc=test"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret-for-tests"  # noqa: S105 - a throwaway test directory
READER_DN = f"cn=reader,{BASE_DN}"
READER_PASSWORD = "reader-secret-for-tests"  # noqa: S105

# Active Directory's attributes, enough for the "ad" profile to be tested against slapd:
# the names and meanings are AD's; here they are ordinary attributes the tests set.
AD_SCHEMA = """
attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'userAccountControl'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.3 NAME 'memberOf'
  EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
attributetype ( 1.3.6.1.4.1.99999.1.4 NAME 'objectGUID'
  EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.5 NAME 'uSNChanged'
  EQUALITY integerMatch ORDERING integerOrderingMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.6 NAME 'objectCategory'
  EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'user' SUP inetOrgPerson STRUCTURAL
  MAY ( sAMAccountName $ userAccountControl $ memberOf $ objectGUID $ uSNChanged $ objectCategory ) )
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Slapd:
    """One slapd process. ``start()`` returns once it answers; ``stop()`` ends it (the
    data stays in ``workdir`` so ``start()`` again brings the same directory back)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.workdir / "ad.schema").write_text(AD_SCHEMA)
        includes = "\n".join(
            f"include {SCHEMA_DIR / name}" for name in ("core.schema", "cosine.schema", "inetorgperson.schema",
                                                       "nis.schema")
        )
        (self.workdir / "slapd.conf").write_text(f"""
{includes}
include {self.workdir / "ad.schema"}
modulepath {MODULE_PATH}
moduleload back_mdb
pidfile {self.workdir / "slapd.pid"}
sizelimit unlimited

database mdb
maxsize 1073741824
suffix "{BASE_DN}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {data}
index objectClass eq
index uid,cn,sAMAccountName eq
index member,memberOf eq
index modifyTimestamp,uSNChanged eq
access to attrs=userPassword
  by dn.exact="{READER_DN}" none
  by anonymous auth
  by self write
  by * none
access to *
  by dn.exact="{READER_DN}" read
  by self read
  by * none
""")

    def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [SLAPD, "-d", "0", "-f", str(self.workdir / "slapd.conf"), "-h", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.time() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"slapd did not start: {err[-2000:]}") from None
                if time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError("slapd did not answer within 15 s") from None
                time.sleep(0.05)
        if not self._has_base():
            self._seed_base()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    # --- administration, as the directory's administrator would do it -------------
    def admin(self) -> Connection:
        return Connection(Server(self.url, get_info=ALL), ADMIN_DN, ADMIN_PASSWORD, auto_bind=True,
                          raise_exceptions=True)

    def _has_base(self) -> bool:
        conn = Connection(Server(self.url), ADMIN_DN, ADMIN_PASSWORD, auto_bind=True)
        try:
            return bool(conn.search(BASE_DN, "(objectClass=*)", search_scope="BASE"))
        finally:
            conn.unbind()

    def _seed_base(self) -> None:
        conn = self.admin()
        try:
            conn.add(BASE_DN, ["dcObject", "organization"], {"o": "Test School", "dc": "school"})
            conn.add(PEOPLE_DN, ["organizationalUnit"], {"ou": "people"})
            conn.add(GROUPS_DN, ["organizationalUnit"], {"ou": "groups"})
            conn.add(READER_DN, ["organizationalRole", "simpleSecurityObject"],
                     {"cn": "reader", "userPassword": READER_PASSWORD})
        finally:
            conn.unbind()

    def add_person(self, uid: str, *, cn: str | None = None, password: str | None = None,
                   mail: str | None = None, **extra: object) -> str:
        """An inetOrgPerson ``uid=<uid>,ou=people,...``; returns its DN."""
        dn = f"uid={escape_rdn(uid)},{PEOPLE_DN}"
        attrs: dict[str, object] = {"uid": uid, "cn": cn or uid, "sn": (cn or uid).split()[-1]}
        if password is not None:
            attrs["userPassword"] = password
        if mail:
            attrs["mail"] = mail
        attrs.update(extra)
        with self.admin() as conn:
            conn.add(dn, ["inetOrgPerson"], attrs)
        return dn

    def add_group(self, cn: str, members: list[str]) -> str:
        """A groupOfNames ``cn=<cn>,ou=groups,...`` (groupOfNames needs one member at least:
        an empty group holds the base DN, as directory tools do)."""
        dn = f"cn={escape_rdn(cn)},{GROUPS_DN}"
        with self.admin() as conn:
            conn.add(dn, ["groupOfNames"], {"cn": cn, "member": members or [BASE_DN]})
        return dn

    def modify(self, dn: str, **attrs: object) -> None:
        with self.admin() as conn:
            conn.modify(dn, {name: [(MODIFY_REPLACE, value if isinstance(value, list) else [value])]
                             for name, value in attrs.items()})

    def delete(self, dn: str) -> None:
        with self.admin() as conn:
            conn.delete(dn)

    def wipe_people_and_groups(self) -> None:
        """Delete every entry under ou=people and ou=groups (between tests)."""
        with self.admin() as conn:
            for base in (PEOPLE_DN, GROUPS_DN):
                conn.search(base, "(objectClass=*)", search_scope="LEVEL", attributes=[])
                for entry in list(conn.entries):
                    conn.delete(entry.entry_dn)


def escape_rdn(value: str) -> str:
    from ldap3.utils.dn import escape_rdn as _escape

    return str(_escape(value))
