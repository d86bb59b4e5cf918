"""CSV roster import (issue 7): the ``darbaza roster import`` command and the console
page, checked through the database, the activation page and HTTP like an operator."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from idp.accounts.models import ActivationCode, User
from idp.audit.models import AuditEvent
from idp.oidc.models import AccessToken
from tests.integration.test_cli import run

HEADER = "login,display_name,role,class,email,guardian_of,locale\n"


def release_roster_accounts(server) -> None:  # type: ignore[no-untyped-def]
    """The roster is the whole school: an import disables every roster account missing
    from its file. The database is shared by the tests of this process, so each test
    starts (and ends) with no roster-managed account: earlier ones become "local"."""
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.source == "roster").values(source="local"))


@pytest.fixture(autouse=True)
def _own_roster(server):  # type: ignore[no-untyped-def]
    release_roster_accounts(server)
    yield
    release_roster_accounts(server)


def tag() -> str:
    return "r" + secrets.token_hex(3)


def write(tmp_path: Path, text: str, *, bom: bool = False, name: str = "roster.csv") -> str:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


def good_roster(t: str, sep: str = ",") -> str:
    rows = [
        ["login", "display_name", "role", "class", "email", "guardian_of", "locale"],
        [f"{t}.aigerim", "Айгерим Токонова", "student", f"7A{t[-2:].upper()}", "", "", "ky"],
        [f"{t}.bolot", "Болот Ибраев", "student", f"7A{t[-2:].upper()}|7B{t[-2:].upper()}", "", "", "ru"],
        [f"{t}.mama", "Гүлнара Токонова", "parent", "", f"{t}.mama@example.kg", f"{t}.aigerim|{t}.bolot", "ky"],
        [f"{t}.teacher", "Nurlan Asanov", "teacher|staff", "", f"{t}.t@example.kg", "", "en"],
    ]
    return "".join(sep.join(r) + "\n" for r in rows)


def account(server, login: str) -> dict[str, object] | None:
    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == login))
        if user is None:
            return None
        return {"name": user.display_name, "email": user.email, "locale": user.locale,
                "roles": sorted(user.role_names), "classes": sorted(user.class_names),
                "children": sorted(c.login for c in user.children), "has_password": user.password_hash is not None,
                "codes": session.scalar(select(func.count()).select_from(ActivationCode)
                                        .where(ActivationCode.user_id == user.id))}


def count_users(server, prefix: str) -> int:
    with server.services.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(User).where(User.login.like(prefix + ".%"))) or 0)


def test_good_file_creates_accounts_with_activation_codes(server, tmp_path, browser):
    t = tag()
    result = run(server, "roster", "import", write(tmp_path, good_roster(t)))
    assert result.exit_code == 0, result.output
    assert "created 4, updated 0" in result.output
    mama = account(server, f"{t}.mama")
    assert mama is not None
    assert mama["children"] == [f"{t}.aigerim", f"{t}.bolot"] and mama["roles"] == ["parent"]
    assert mama["email"] == f"{t}.mama@example.kg" and mama["locale"] == "ky"
    bolot = account(server, f"{t}.bolot")
    assert bolot is not None and bolot["name"] == "Болот Ибраев"
    assert bolot["classes"] == sorted([f"7A{t[-2:].upper()}", f"7B{t[-2:].upper()}"])
    assert bolot["has_password"] is False and bolot["codes"] == 1
    teacher = account(server, f"{t}.teacher")
    assert teacher is not None and teacher["roles"] == ["staff", "teacher"]
    # The printed code activates the account: it sets the person's own password.
    line = next(x for x in result.output.splitlines() if x.startswith(f"{t}.bolot\t"))
    code = line.split("\t")[1]
    page = browser.get("/activate")
    assert page.status_code == 200
    with server.services.db.transaction() as session:
        from idp.accounts.admin import redeem_activation_code

        user = redeem_activation_code(session, server.services.passwords, server.services.journal,
                                      login=f"{t}.bolot", code=code, new_password="a new long passphrase 77")
        assert user.login == f"{t}.bolot"
    with server.services.db.transaction() as session:
        actors = set(session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "account:create",
                                                                    AuditEvent.details["login"].as_string()
                                                                    == f"{t}.bolot")))
    assert actors == {"cli:roster"}


def test_reimport_is_a_no_op_and_a_change_is_an_update(server, tmp_path):
    t = tag()
    path = write(tmp_path, good_roster(t))
    assert run(server, "roster", "import", path).exit_code == 0
    second = run(server, "roster", "import", path)
    assert second.exit_code == 0, second.output
    assert "created 0, updated 0, disabled 0, unchanged 4" in second.output
    assert account(server, f"{t}.bolot")["codes"] == 1  # type: ignore[index]
    changed = good_roster(t).replace("Болот Ибраев", "Болот Ибраев-Уулу")
    third = run(server, "roster", "import", write(tmp_path, changed, name="b.csv"))
    assert "created 0, updated 1" in third.output, third.output
    assert account(server, f"{t}.bolot")["name"] == "Болот Ибраев-Уулу"  # type: ignore[index]


def test_bom_and_semicolon_separator(server, tmp_path):
    t = tag()
    result = run(server, "roster", "import", write(tmp_path, good_roster(t, sep=";"), bom=True))
    assert result.exit_code == 0, result.output
    aigerim = account(server, f"{t}.aigerim")
    assert aigerim is not None and aigerim["name"] == "Айгерим Токонова" and aigerim["locale"] == "ky"
    assert account(server, f"{t}.mama")["children"] == [f"{t}.aigerim", f"{t}.bolot"]  # type: ignore[index]


def test_every_kind_of_bad_line_is_reported_with_its_line_number_and_nothing_changes(server, tmp_path):
    t = tag()
    text = HEADER + "".join([
        f"{t}.ok,Good Person,student,,,,ky\n",                       # 2: fine
        f"{t}.wiz,Wizard,wizard,,,,\n",                              # 3: unknown role
        "no spaces here,Bad Login,student,,,,\n",                    # 4: bad login
        f"{t}.ok,Again,student,,,,\n",                               # 5: duplicate login
        f"{t}.mum,Mum,parent,,,{t}.nobody,\n",                       # 6: unknown guardian_of
        f"{t}.mail,Mail,student,,not-an-address,,\n",                # 7: bad e-mail
        f"{t}.long,{'x' * 300},student,,,,\n",                       # 8: too long
        f"{t}.nul,Nul\x00Name,student,,,,\n",                        # 9: NUL
        f"{t}.loc,Locale,student,,,,de\n",                           # 10: bad locale
        f"{t}.few,Few,student\r\n",                                  # 11: wrong number of fields (CRLF)
        f"{t}.sep,Line\u2028Separator,student,,,,\n",                # 12: fine (U+2028 is not a line end)
        f"{t}.empty,,student,,,,\n",                                  # 13: empty display_name
    ])
    path = write(tmp_path, text)
    dry = run(server, "roster", "import", path, "--dry-run")
    apply = run(server, "roster", "import", path)
    for result in (dry, apply):
        assert result.exit_code == 1, result.output
        out = result.output
        assert "line 3: unknown role: wizard" in out
        assert "line 4: bad login" in out
        assert "line 5: duplicate login" in out and "line 2" in out
        assert f"line 6: unknown guardian_of login: {t}.nobody" in out
        assert "line 7: bad e-mail" in out
        assert "line 8: too long: display_name" in out
        assert "line 9: the line contains a NUL character" in out
        assert "line 10: locale must be" in out
        assert "line 11: expected 7 fields" in out
        assert "line 13: display_name is empty" in out
        assert "line 12:" not in out
        assert "line 2:" not in out
    assert "nothing was changed" in apply.output
    # All or nothing: the good line 2 was not imported either.
    assert account(server, f"{t}.ok") is None


def test_dry_run_changes_nothing(server, tmp_path):
    t = tag()
    path = write(tmp_path, good_roster(t))
    with server.services.db.transaction() as session:
        events_before = session.scalar(select(func.count()).select_from(AuditEvent))
    result = run(server, "roster", "import", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"create {t}.bolot" in result.output
    assert "would create 4, update 0, disable 0" in result.output
    assert count_users(server, t) == 0
    with server.services.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == events_before


def test_apply_is_all_or_nothing_when_a_change_is_refused(server, tmp_path, make_user):
    # The file is valid, but one class name breaks AccountAdmin's rule in the middle of
    # applying: the accounts created before it are rolled back.
    t = tag()
    text = HEADER + f"{t}.first,First,student,,,,\n{t}.second,Second,student,B@D!,,,\n"
    result = run(server, "roster", "import", write(tmp_path, text))
    assert result.exit_code == 1, result.output
    assert "line 3: class name" in result.output and "nothing was changed" in result.output
    assert count_users(server, t) == 0


def test_codes_out_file_is_private(server, tmp_path):
    t = tag()
    out = tmp_path / "codes.txt"
    result = run(server, "roster", "import", write(tmp_path, good_roster(t)), "--codes-out", str(out))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 2 for line in lines)
    assert "\t" not in result.output  # the codes are not printed as well


def test_unreadable_file_exits_2(server, tmp_path):
    missing = run(server, "roster", "import", str(tmp_path / "nope.csv"))
    assert missing.exit_code == 2
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00l\x00o\x00g")
    assert run(server, "roster", "import", str(binary)).exit_code == 2
    no_header = run(server, "roster", "import", write(tmp_path, "name,whatever\nx,y\n", name="h.csv"))
    assert no_header.exit_code == 2 and "missing" in no_header.output


# --- the console page -------------------------------------------------------------------
def upload(browser, text: str, *, bom: bool = False):  # type: ignore[no-untyped-def]
    from tests.helpers import form_fields

    page = browser.get("/admin/roster")
    assert page.status_code == 200, page.text[:300]
    action, fields = form_fields(page.text, "/admin/roster")
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    return browser.post(action, data=fields, files={"file": ("roster.csv", data, "text/csv")})


def test_console_upload_report_apply_and_codes_shown_once(server, make_user, tmp_path):
    from tests.integration.admin.test_accounts import console

    browser, admin = console(server, make_user, "school_admin")
    t = tag()
    report = upload(browser, good_roster(t, sep=";"), bom=True)
    assert report.status_code == 200, report.text[:500]
    assert "Create: 4. Update: 0. Disable: 0." in report.text
    assert f"{t}.bolot" in report.text
    assert count_users(server, t) == 0  # the report changed nothing
    done = browser.submit(report, "/admin/roster/apply")
    assert done.status_code == 200, done.text[:500]
    assert done.headers["Cache-Control"] == "no-store"
    codes = __import__("re").findall(r'<td class="code">([A-Z0-9-]{14})</td>', done.text)
    assert len(codes) == 4
    assert count_users(server, t) == 4
    with server.services.db.transaction() as session:
        actors = set(session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "account:create",
                                                                    AuditEvent.details["login"].as_string()
                                                                    .like(t + ".%"))))
    assert actors == {f"user:{admin.id}"}
    # Applying again (a replayed form) does not run the import twice.
    again = browser.submit(report, "/admin/roster/apply")
    assert again.status_code == 400 and "Upload the file again" in again.text
    # The same file again: nothing to do.
    assert "Create: 0. Update: 0. Disable: 0. Unchanged: 4." in upload(browser, good_roster(t)).text


def test_console_shows_bad_lines_and_offers_no_apply(server, make_user):
    from tests.integration.admin.test_accounts import console

    browser, _ = console(server, make_user, "school_admin")
    t = tag()
    report = upload(browser, HEADER + f"{t}.a,A,student,,,,\n{t}.b,B,wizard,,,,\n")
    assert report.status_code == 200
    assert "Line 3: unknown role: wizard" in report.text
    assert "/admin/roster/apply" not in report.text
    unreadable = upload(browser, "nothing,useful\n")
    assert unreadable.status_code == 400 and "cannot be read" in unreadable.text
    assert count_users(server, t) == 0


def test_console_roster_needs_users_write(server, make_user):
    from tests.integration.admin.test_accounts import console

    browser, _ = console(server, make_user, "tech_support")
    assert browser.get("/admin/roster").status_code == 403
    t = tag()
    page = browser.get("/admin/accounts")
    token = __import__("re").search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    data = {"csrf_token": token.group(1) if token else ""}
    response = browser.post("/admin/roster", data=data, files={"file": ("r.csv", good_roster(t).encode(), "text/csv")})
    assert response.status_code == 403
    assert browser.post("/admin/roster/apply", data=data).status_code == 403
    assert count_users(server, t) == 0


# --- roster-managed accounts: disabling and enabling again ---------------------------------
def state(server, login: str) -> dict[str, object]:
    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == login))
        assert user is not None, login
        return {"source": user.source, "active": user.active, "source_disabled_at": user.source_disabled_at,
                "name": user.display_name}


def journal(server, login: str, action: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        user_id = session.scalar(select(User.id).where(User.login == login))
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.subject == f"user:{user_id}")))
        for row in rows:
            session.expunge(row)
        return rows


def without(text: str, login: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith(login + ","))


def activated(server, output: str, login: str, password: str) -> None:
    """Redeem the printed activation code of ``login`` (the person sets a password)."""
    from idp.accounts.admin import redeem_activation_code

    code = next(x for x in output.splitlines() if x.startswith(login + "\t")).split("\t")[1]
    with server.services.db.transaction() as session:
        redeem_activation_code(session, server.services.passwords, server.services.journal,
                               login=login, code=code, new_password=password)


def test_missing_roster_account_is_disabled_signed_out_and_enabled_again(server, tmp_path, make_client):
    from tests.helpers import Browser, UserInfo
    from tests.integration.test_rfc9700 import get_tokens, userinfo_status

    t = tag()
    first = write(tmp_path, good_roster(t))
    imported = run(server, "roster", "import", first)
    assert imported.exit_code == 0, imported.output
    bolot = f"{t}.bolot"
    assert {state(server, f"{t}.{x}")["source"] for x in ("aigerim", "bolot", "mama", "teacher")} == {"roster"}
    password = "a new long passphrase 77"
    activated(server, imported.output, bolot, password)
    # Bolot is signed in on the provider and holds tokens of a portal app.
    browser = Browser(server.url)
    assert browser.sign_in(bolot, password).status_code == 303
    assert browser.get("/").status_code == 200
    client = make_client()
    tokens = get_tokens(server, Browser(server.url), client, UserInfo(id=0, login=bolot, password=password,
                                                                      subject=""))
    assert userinfo_status(server, tokens["access_token"]) == 200

    second = write(tmp_path, without(good_roster(t), bolot), name="second.csv")
    # The dry run lists him and changes nothing.
    dry = run(server, "roster", "import", second, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"disable {bolot}" in dry.output
    assert "would create 0, update 0, disable 1, unchanged 3" in dry.output
    assert state(server, bolot)["active"] is True and browser.get("/").status_code == 200
    assert journal(server, bolot, "roster:account:disable") == []

    applied = run(server, "roster", "import", second)
    assert applied.exit_code == 0, applied.output
    assert "created 0, updated 0, disabled 1, unchanged 3" in applied.output
    assert f"disabled {bolot}" in applied.output
    after = state(server, bolot)
    assert after["active"] is False and after["source_disabled_at"] is not None and after["source"] == "roster"
    assert state(server, f"{t}.aigerim")["active"] is True
    # Signed out everywhere, tokens revoked, cannot sign in again.
    gone = browser.get("/")
    assert gone.status_code == 302 and "/login" in gone.headers["Location"]
    assert userinfo_status(server, tokens["access_token"]) == 401
    with server.services.db.transaction() as session:
        user_id = session.scalar(select(User.id).where(User.login == bolot))
        live = session.scalar(select(func.count()).select_from(AccessToken)
                              .where(AccessToken.user_id == user_id, AccessToken.revoked_at.is_(None)))
    assert live == 0
    assert Browser(server.url).sign_in(bolot, password).status_code != 303
    disabled = journal(server, bolot, "roster:account:disable")
    assert len(disabled) == 1 and disabled[0].actor == "cli:roster" and disabled[0].details["sessions_ended"] >= 1

    # The same file again changes nothing.
    again = run(server, "roster", "import", second)
    assert "created 0, updated 0, disabled 0, unchanged 3" in again.output, again.output
    assert len(journal(server, bolot, "roster:account:disable")) == 1

    # Listed again: enabled again, with the password he set.
    dry_back = run(server, "roster", "import", first, "--dry-run")
    assert f"re-enable {bolot}" in dry_back.output and "update 1, disable 0" in dry_back.output
    assert state(server, bolot)["active"] is False
    back = run(server, "roster", "import", first)
    assert back.exit_code == 0, back.output
    assert "created 0, updated 1, disabled 0, unchanged 3, re-enabled 1" in back.output
    restored = state(server, bolot)
    assert restored["active"] is True and restored["source_disabled_at"] is None
    assert len(journal(server, bolot, "roster:account:enable")) == 1
    assert Browser(server.url).sign_in(bolot, password).status_code == 303
    assert "created 0, updated 0, disabled 0, unchanged 4" in run(server, "roster", "import", first).output


def test_an_account_disabled_by_an_administrator_is_not_enabled_by_the_roster(server, tmp_path):
    t = tag()
    path = write(tmp_path, good_roster(t))
    assert run(server, "roster", "import", path).exit_code == 0
    aigerim = f"{t}.aigerim"
    with server.services.db.transaction() as session:  # as an administrator disables it
        session.scalar(select(User).where(User.login == aigerim)).active = False
    listed = run(server, "roster", "import", path)
    assert "created 0, updated 0, disabled 0, unchanged 4, re-enabled 0" in listed.output, listed.output
    assert state(server, aigerim)["active"] is False
    # Missing from the file: not "disabled" again (it is not active), and still not enabled after.
    missing = run(server, "roster", "import", write(tmp_path, without(good_roster(t), aigerim), name="m.csv"))
    assert "disabled 0" in missing.output and state(server, aigerim)["source_disabled_at"] is None
    assert "re-enabled 0" in run(server, "roster", "import", path).output
    assert state(server, aigerim)["active"] is False
    assert journal(server, aigerim, "roster:account:enable") == []


def test_local_accounts_are_updated_but_stay_local_and_are_never_disabled(server, tmp_path, make_user):
    t = tag()
    local = make_user(roles=("student",), login=f"{t}.local", display_name="Old Name")
    text = good_roster(t) + f"{t}.local,New Name,student,,,,ky\n"
    imported = run(server, "roster", "import", write(tmp_path, text))
    assert "created 4, updated 1" in imported.output, imported.output
    assert state(server, local.login) == {"source": "local", "active": True, "source_disabled_at": None,
                                          "name": "New Name"}
    missing = run(server, "roster", "import", write(tmp_path, good_roster(t), name="m.csv"))
    assert "disabled 0, unchanged 4" in missing.output, missing.output
    assert state(server, local.login)["active"] is True


def test_a_line_naming_a_directory_account_is_a_bad_line(server, tmp_path, make_user):
    t = tag()
    person = make_user(roles=("student",), login=f"{t}.dir")
    with server.services.db.transaction() as session:
        user = session.get(User, person.id)
        user.source = "directory"
        user.password_hash = None
    path = write(tmp_path, HEADER + f"{t}.ok,Fine,student,,,,\n{t}.dir,Directory Person,student,,,,\n")
    for args in (("--dry-run",), ()):
        result = run(server, "roster", "import", path, *args)
        assert result.exit_code == 1, result.output
        assert "line 3: the account is managed by the school directory" in result.output
    assert account(server, f"{t}.ok") is None
    assert state(server, person.login)["name"] == "Test User"


def big_roster(t: str, count: int) -> str:
    return HEADER + "".join(f"{t}.s{i:02d},Student {i},student,,,,\n" for i in range(count))


def test_mass_disable_is_refused_unless_allowed(server, tmp_path):
    t = tag()
    full = write(tmp_path, big_roster(t, 12))
    assert run(server, "roster", "import", full).exit_code == 0
    # Disabling 10 or fewer (here 2 of 12) needs no option.
    ten = run(server, "roster", "import", write(tmp_path, big_roster(t, 10), name="ten.csv"))
    assert ten.exit_code == 0 and "disabled 2" in ten.output, ten.output
    assert "re-enabled 2" in run(server, "roster", "import", full).output
    partial = write(tmp_path, big_roster(t, 1), name="partial.csv")
    dry = run(server, "roster", "import", partial, "--dry-run")
    assert dry.exit_code == 0
    assert "disable 11" in dry.output and "--allow-mass-disable" in dry.output
    refused = run(server, "roster", "import", partial)
    assert refused.exit_code == 3, refused.output
    assert "would disable 11 of 12" in refused.output and "nothing was changed" in refused.output
    assert all(state(server, f"{t}.s{i:02d}")["active"] for i in range(12))
    allowed = run(server, "roster", "import", partial, "--allow-mass-disable")
    assert allowed.exit_code == 0, allowed.output
    assert "disabled 11" in allowed.output
    assert [state(server, f"{t}.s{i:02d}")["active"] for i in range(12)] == [True] + [False] * 11


def apply_form(browser, page, *, confirm: bool):  # type: ignore[no-untyped-def]
    """Submit the report's apply form, with the mass-disable checkbox ticked or not."""
    from tests.helpers import form_fields

    action, fields = form_fields(page.text, "/admin/roster/apply")
    fields.pop("allow_mass_disable", None)
    if confirm:
        fields["allow_mass_disable"] = "y"
    return browser.post(action, data=fields)


def test_console_lists_and_counts_disabled_accounts_and_asks_before_a_mass_disable(server, make_user):
    from tests.integration.admin.test_accounts import console

    browser, admin = console(server, make_user, "school_admin")
    t = tag()
    assert apply_form(browser, upload(browser, big_roster(t, 13)), confirm=False).status_code == 200
    # One missing: listed in the report, counted when applied, no confirmation needed.
    report = upload(browser, without(big_roster(t, 13), f"{t}.s05"))
    assert "Disable: 1." in report.text and 'id="mass-disable"' not in report.text
    assert f"<li>{t}.s05 — Student 5</li>" in report.text
    assert state(server, f"{t}.s05")["active"] is True  # the report changed nothing
    done = apply_form(browser, report, confirm=False)
    assert done.status_code == 200, done.text[:500]
    assert "Disabled: 1." in done.text and f"<li>{t}.s05</li>" in done.text
    assert state(server, f"{t}.s05")["active"] is False
    assert journal(server, f"{t}.s05", "roster:account:disable")[0].actor == f"user:{admin.id}"
    # Only one left in the file: 11 of the 12 active roster accounts.
    report = upload(browser, big_roster(t, 1))
    assert "Disable: 11." in report.text and 'id="mass-disable"' in report.text
    refused = apply_form(browser, report, confirm=False)
    assert refused.status_code == 400
    assert "Nothing was changed: confirm that 11 accounts are to be disabled." in refused.text
    assert state(server, f"{t}.s12")["active"] is True
    done = apply_form(browser, refused, confirm=True)
    assert done.status_code == 200, done.text[:500]
    assert "Disabled: 11." in done.text
    assert [state(server, f"{t}.s{i:02d}")["active"] for i in range(13)] == [True] + [False] * 12
