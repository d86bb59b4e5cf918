"""CSV roster import (issue 7): the ``darbaza roster import`` command and the console
page, checked through the database, the activation page and HTTP like an operator."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from sqlalchemy import func, select

from idp.accounts.models import ActivationCode, User
from idp.audit.models import AuditEvent
from tests.integration.test_cli import run

HEADER = "login,display_name,role,class,email,guardian_of,locale\n"


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
