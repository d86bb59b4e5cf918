"""The outbox's retry schedule and its template rendering (pure, no I/O)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from idp.notify.outbox import LOCALES, TEMPLATES, TEMPLATES_DIR, Outbox, OutboxError, retry_delay


def test_backoff_doubles_from_30_seconds():
    assert [retry_delay(n).total_seconds() for n in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1920, 3600]


@pytest.mark.parametrize("attempts", [8, 9, 20, 1000, 10**9])
def test_backoff_is_capped_at_one_hour(attempts):
    assert retry_delay(attempts) == timedelta(hours=1)


def test_backoff_never_shrinks():
    delays = [retry_delay(n) for n in range(1, 100)]
    assert delays == sorted(delays)


def test_backoff_refuses_zero_attempts():
    with pytest.raises(ValueError):
        retry_delay(0)


def test_every_message_exists_in_every_language():
    for template in TEMPLATES:
        for locale in LOCALES:
            assert (TEMPLATES_DIR / f"{template}.{locale}.txt").is_file(), (template, locale)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_renders_with_its_documented_context(template):
    outbox = Outbox(mail_from="no-reply@school.example", defaults={"school_name": "Demo School"})
    context = {name: f"<{name}>" for name in TEMPLATES[template]}
    subjects = set()
    for locale in LOCALES:
        rendered = outbox.render(template, locale, context)
        subjects.add(rendered.subject)
        assert rendered.subject and "\n" not in rendered.subject
        assert "Demo School" in rendered.body
        for name in TEMPLATES[template]:
            if name != "method":
                assert f"<{name}>" in rendered.body, (locale, name)
    assert len(subjects) == 3  # really translated, not one text three times


def test_missing_context_and_unknown_template_are_clear_errors():
    outbox = Outbox(mail_from="no-reply@school.example", defaults={"school_name": "S"})
    with pytest.raises(OutboxError, match="needs changed_at"):
        outbox.render("password_changed", "en", {"display_name": "x"})
    with pytest.raises(OutboxError, match="unknown mail template"):
        outbox.render("lottery_win", "en", {})


def test_unknown_locale_falls_back_to_the_default():
    outbox = Outbox(mail_from="no-reply@school.example", default_locale="ky")
    assert outbox.locale_for("ru-RU") == "ru"
    assert outbox.locale_for("de") == "ky"
    assert outbox.locale_for(None) == "ky"
