"""The confidentiality obligation (policy 2.5: "the employee accepts an obligation not
to disclose confidential information").

Each role may have an obligation text, kept in Kyrgyz, Russian and English and
versioned: publishing a new text adds the next version and never changes an old one,
so every acceptance keeps pointing at the exact words the person accepted. At sign-in
(idp/login/obligation.py) a person accepts the current version of the obligation of
each of their roles that they have not accepted yet; no session exists before that.

The school's employee roles (``SEEDED_ROLES_REQUIRING_2FA``) get version 1 of the
default text below when the roles are seeded. No Flask here: the sign-in step, the
console and the CLI call these functions with their own collaborators."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idp.access.permissions import SEEDED_ROLE_PERMISSIONS
from idp.accounts.models import (
    SEEDED_ROLES_REQUIRING_2FA,
    Obligation,
    ObligationAcceptance,
    Role,
    User,
    user_roles,
)
from idp.audit.journal import Journal

if TYPE_CHECKING:
    from idp.accounts.admin import Actor

LANGUAGES = ("ky", "ru", "en")
# Long enough for a real obligation with its legal references; a limit so that one
# form post cannot put megabytes into every later sign-in page.
MAX_TEXT = 20_000
SYSTEM = "system"


class ObligationError(ValueError):
    """An obligation text cannot be published as given; ``code`` says why and
    ``language`` which text is at fault."""

    def __init__(self, code: str, language: str | None = None) -> None:
        super().__init__(f"{code}: {language}" if language else code)
        self.code = code
        self.language = language


EMPTY = "empty"
TOO_LONG = "too-long"
UNCHANGED = "unchanged"


# --- the default text (policy 2.5, 4.2.5, 5.2.1-5.2.3) --------------------------------
# One text for every employee role; the roles that open the console (tech support,
# the security officer, the school administrator) get one more clause about their
# access to other people's accounts (policy 2.5: oversight of those who work with
# confidential information).

_TITLE = {
    "ky": "Купуя маалыматты жарыя кылбоо милдеттенмеси",
    "ru": "Обязательство о неразглашении конфиденциальной информации",
    "en": "Obligation not to disclose confidential information",
}

_INTRO = {
    "ky": "Мен, мектептин кызматкери, мектептин маалыматтык коопсуздук саясатына (2.5 жана 5.2-пункттар) "
          "ылайык төмөнкү милдеттенмени кабыл алам:",
    "ru": "Я, работник школы, в соответствии с политикой информационной безопасности школы (пункты 2.5 и 5.2) "
          "принимаю на себя следующее обязательство:",
    "en": "As an employee of the school, under the school's information-security policy (items 2.5 and 5.2), "
          "I accept the following obligation:",
}

_CLAUSES = {
    "ky": [
        "Кызматтык милдеттеримди аткарууда алган же көргөн маалыматты купуя сактайм. Буга окуучулардын, "
        "алардын ата-энелеринин жана мектеп кызматкерлеринин жеке маалыматтары (аты-жөнү, туулган күнү, "
        "дареги, телефон номери, ден соолугу жөнүндө маалыматтар), окуучулардын баалары жана жетишкендиктери, "
        "ошондой эле «Кызматтык колдонуу үчүн» грифи бар документтер кирет.",
        "Бул маалыматты кызматтык милдетине ылайык аны алууга укугу бар адамдардан башка эч кимге оозеки да, "
        "жазуу түрүндө да, көчүрүп же жарыялап да (анын ичинде мессенджерлерде жана социалдык тармактарда) "
        "бербейм.",
        "Мектеп порталын жана андагы маалыматты кызматтык милдеттеримди аткаруу үчүн гана колдоном. "
        "«Кызматтык колдонуу үчүн» грифи бар документтерди мектептин сыртына чыгарбайм.",
        "Өздүк кабинетиме кирүү шарттарын (логин, сырсөз, аутентификатор тиркемесиндеги коддор, калыбына "
        "келтирүү коддору) купуя сактайм. Логинимди жана сырсөзүмдү эч кимге айтпайм жана аккаунтумду башка "
        "адамга колдонууга бербейм.",
        "Сырсөзүм бөтөн адамга белгилүү болуп калды, аккаунтумду башка бирөө колдонуп жатат же купуя "
        "маалымат жарыя болуп калды деп шектенсем, бул тууралуу бир жумушчу күндүн ичинде мектеп порталынын техникалык колдоо кызматына "
        "билдирем.",
        "Кыргыз Республикасынын жеке мүнөздөгү маалымат жөнүндө мыйзамдарынын талаптарын сактайм. Купуя "
        "маалыматты жарыя кылган учурда Кыргыз Республикасынын мыйзамдарына ылайык жоопко тартыларымды "
        "билем.",
        "Бул милдеттенме мектептеги ишим токтогондон же милдеттерим өзгөргөндөн кийин да күчүндө калат.",
    ],
    "ru": [
        "Я сохраняю в тайне информацию, которую получаю или вижу при исполнении своих обязанностей: "
        "персональные данные учащихся, их родителей и работников школы (фамилии и имена, даты рождения, "
        "адреса, номера телефонов, сведения о здоровье), оценки и успеваемость учащихся, а также документы "
        "с грифом «Для служебного пользования».",
        "Я не передаю эту информацию никому, кроме лиц, которым она положена по их служебным обязанностям, — "
        "ни устно, ни письменно, ни путём копирования или публикации (в том числе в мессенджерах и "
        "социальных сетях).",
        "Я использую школьный портал и информацию в нём только для исполнения своих служебных обязанностей. "
        "Я не выношу документы с грифом «Для служебного пользования» за пределы школы.",
        "Я сохраняю в тайне условия доступа к своему личному кабинету (логин, пароль, коды из приложения-"
        "аутентификатора, коды восстановления). Я никому не сообщаю свой логин и пароль и не позволяю "
        "другим пользоваться моей учётной записью.",
        "Если я подозреваю, что мой пароль стал известен постороннему, моей учётной записью пользуется кто-то "
        "другой или конфиденциальная информация разглашена, я сообщаю об этом в службу технической поддержки "
        "школьного портала в течение одного рабочего дня.",
        "Я соблюдаю законодательство Кыргызской Республики об информации персонального характера и знаю, "
        "что за разглашение конфиденциальной информации несу ответственность в соответствии с "
        "законодательством Кыргызской Республики.",
        "Это обязательство сохраняет силу и после прекращения моей работы в школе или изменения моих "
        "обязанностей.",
    ],
    "en": [
        "I keep confidential the information I receive or see while doing my work: the personal data of "
        "pupils, their parents and the school's employees (names, dates of birth, addresses, telephone "
        "numbers, health information), pupils' marks and results, and documents marked \"For official use\".",
        "I do not pass this information to anyone except people who are entitled to it by their duties — "
        "not by word of mouth, in writing, by copying or by publishing it (including in messengers and "
        "social networks).",
        "I use the school portal and the information in it only to do my work. I do not take documents "
        "marked \"For official use\" outside the school.",
        "I keep the access conditions of my personal cabinet confidential (login, password, codes from the "
        "authenticator app, recovery codes). I tell nobody my login or password and let nobody else use my "
        "account.",
        "If I suspect that someone else has learned my password or uses my account, or that confidential "
        "information has been disclosed, I report it to the school portal's technical support within one "
        "working day.",
        "I comply with the laws of the Kyrgyz Republic on personal data, and I know that I am liable under "
        "the laws of the Kyrgyz Republic for disclosing confidential information.",
        "This obligation remains in force after I leave the school or my duties change.",
    ],
}

_CONSOLE_CLAUSE = {
    "ky": "Башкаруу панели аркылуу башка адамдардын аккаунттарына жана маалыматтарына болгон мүмкүнчүлүгүмдү "
          "кызматтык милдеттеримди аткаруу үчүн гана колдоном. Башкаруу панелиндеги ар бир аракетим аудит "
          "журналына жазыларын билем.",
    "ru": "Доступ к чужим учётным записям и данным через панель управления я использую только для исполнения "
          "своих служебных обязанностей. Я знаю, что каждое моё действие в панели управления записывается в "
          "журнал аудита.",
    "en": "I use my access to other people's accounts and data through the console only to do my work. I know "
          "that every action I take in the console is recorded in the audit journal.",
}


def default_texts(role_name: str) -> dict[str, str]:
    """Version 1 of the obligation for a seeded role, in the three languages."""
    console = bool(SEEDED_ROLE_PERMISSIONS.get(role_name))
    texts: dict[str, str] = {}
    for lang in LANGUAGES:
        clauses = [*_CLAUSES[lang], *([_CONSOLE_CLAUSE[lang]] if console else [])]
        numbered = "\n".join(f"{n}. {clause}" for n, clause in enumerate(clauses, start=1))
        texts[lang] = f"{_TITLE[lang]}\n\n{_INTRO[lang]}\n\n{numbered}\n"
    return texts


# --- reading --------------------------------------------------------------------------
def latest_for_role(db: Session, role: Role) -> Obligation | None:
    """The role's current obligation (its highest version), or None."""
    return db.scalar(
        select(Obligation).where(Obligation.role_id == role.id).order_by(Obligation.version.desc()).limit(1)
    )


def latest_versions(db: Session) -> dict[int, int]:
    """Role id -> the version of its current obligation, for roles that have one."""
    rows = db.execute(select(Obligation.role_id, func.max(Obligation.version)).group_by(Obligation.role_id))
    return {role_id: version for role_id, version in rows}


def versions_for_role(db: Session, role: Role) -> list[Obligation]:
    """Every version of the role's obligation, newest first."""
    return list(db.scalars(select(Obligation).where(Obligation.role_id == role.id)
                           .order_by(Obligation.version.desc())))


def current_obligations(db: Session, user: User) -> list[Obligation]:
    """The latest version for each of the account's roles that has an obligation,
    ordered by role name."""
    role_ids = [r.id for r in user.roles]
    if not role_ids:
        return []
    latest = (
        select(Obligation.role_id, func.max(Obligation.version).label("version"))
        .where(Obligation.role_id.in_(role_ids))
        .group_by(Obligation.role_id)
        .subquery()
    )
    rows = db.scalars(
        select(Obligation).join(
            latest, (Obligation.role_id == latest.c.role_id) & (Obligation.version == latest.c.version)
        )
    )
    return sorted(rows, key=lambda o: o.role.name)


def _accepted_ids(db: Session, user: User, obligation_ids: Iterable[int]) -> set[int]:
    ids = list(obligation_ids)
    if not ids:
        return set()
    return set(db.scalars(
        select(ObligationAcceptance.obligation_id)
        .where(ObligationAcceptance.user_id == user.id, ObligationAcceptance.obligation_id.in_(ids))
    ))


def pending_obligations(db: Session, user: User) -> list[Obligation]:
    """The current obligations the account has not accepted yet."""
    current = current_obligations(db, user)
    accepted = _accepted_ids(db, user, (o.id for o in current))
    return [o for o in current if o.id not in accepted]


def obligations_pending(db: Session, user: User) -> bool:
    """Whether the sign-in must stop at the obligation step (idp/login/pending.py)."""
    return bool(pending_obligations(db, user))


def acceptances(db: Session, user: User) -> list[ObligationAcceptance]:
    """Everything the account accepted, newest first."""
    return list(db.scalars(
        select(ObligationAcceptance).where(ObligationAcceptance.user_id == user.id)
        .order_by(ObligationAcceptance.accepted_at.desc(), ObligationAcceptance.id.desc())
    ))


@dataclass
class ObligationStatus:
    """One role's obligation as it stands for one account: the current version and
    whether (and when) the account accepted it."""

    obligation: Obligation
    accepted_at: datetime | None

    @property
    def pending(self) -> bool:
        return self.accepted_at is None


def status_for(db: Session, user: User) -> list[ObligationStatus]:
    current = current_obligations(db, user)
    rows = db.execute(
        select(ObligationAcceptance.obligation_id, ObligationAcceptance.accepted_at)
        .where(ObligationAcceptance.user_id == user.id,
               ObligationAcceptance.obligation_id.in_([o.id for o in current]))
    ).all() if current else []
    when = {oid: at for oid, at in rows}
    return [ObligationStatus(obligation=o, accepted_at=when.get(o.id)) for o in current]


def acceptance_count(db: Session, obligation: Obligation) -> tuple[int, int]:
    """How many of the role's members accepted this version, and how many members
    the role has."""
    members = select(user_roles.c.user_id).where(user_roles.c.role_id == obligation.role_id)
    total = db.scalar(select(func.count()).select_from(members.subquery())) or 0
    accepted = db.scalar(
        select(func.count(ObligationAcceptance.id)).where(
            ObligationAcceptance.obligation_id == obligation.id, ObligationAcceptance.user_id.in_(members)
        )
    ) or 0
    return accepted, total


# --- writing --------------------------------------------------------------------------
def ensure_default_obligations(db: Session) -> list[Obligation]:
    """Give every seeded employee role without an obligation version 1 of the default
    text. Roles an administrator already gave a text keep it."""
    roles = db.scalars(select(Role).where(Role.name.in_(sorted(SEEDED_ROLES_REQUIRING_2FA)))).all()
    if not roles:
        return []
    having = set(db.scalars(select(Obligation.role_id).where(Obligation.role_id.in_([r.id for r in roles]))))
    created: list[Obligation] = []
    for role in sorted(roles, key=lambda r: r.name):
        if role.id in having:
            continue
        texts = default_texts(role.name)
        obligation = Obligation(role=role, version=1, text_ky=texts["ky"], text_ru=texts["ru"],
                                text_en=texts["en"], created_by=SYSTEM)
        db.add(obligation)
        created.append(obligation)
    if created:
        db.flush()
    return created


def accept(
    db: Session,
    journal: Journal,
    user: User,
    obligations: Iterable[Obligation],
    *,
    ip: str | None,
    locale: str | None,
    request_id: str | None,
) -> list[ObligationAcceptance]:
    """Record that ``user`` accepted these versions, in the caller's transaction, and
    journal each acceptance (``account:obligation:accept``). Versions accepted before
    are skipped, so a repeated form post records nothing twice."""
    wanted = {o.id: o for o in obligations}
    already = _accepted_ids(db, user, wanted)
    lang = locale if locale in LANGUAGES else "ky"
    made: list[ObligationAcceptance] = []
    for obligation in sorted(wanted.values(), key=lambda o: o.role.name):
        if obligation.id in already:
            continue
        row = ObligationAcceptance(user_id=user.id, obligation_id=obligation.id, ip=ip[:64] if ip else None,
                                   locale=lang)
        db.add(row)
        made.append(row)
        journal.record(
            db, actor=f"user:{user.id}", action="account:obligation:accept", subject=f"user:{user.id}",
            ip=ip, request_id=request_id,
            details={"role": obligation.role.name, "version": obligation.version, "obligation_id": obligation.id,
                     "locale": lang},
        )
    db.flush()
    return made


def clean_texts(texts: Mapping[str, str | None]) -> dict[str, str]:
    """The three texts, trimmed and with one kind of line end; raises ObligationError
    for a missing, empty or too long text."""
    cleaned: dict[str, str] = {}
    for lang in LANGUAGES:
        text = (texts.get(lang) or "").replace("\r\n", "\n").replace("\r", "\n").strip()
        if not text:
            raise ObligationError(EMPTY, lang)
        if len(text) > MAX_TEXT:
            raise ObligationError(TOO_LONG, lang)
        cleaned[lang] = text + "\n"
    return cleaned


def publish(
    db: Session,
    journal: Journal,
    role: Role,
    texts: Mapping[str, str | None],
    actor: Actor,
    *,
    reason: str | None = None,
) -> Obligation:
    """Publish the next version of ``role``'s obligation; everyone with the role
    accepts it at their next sign-in. Journalled as ``role:obligation:publish`` in the
    caller's transaction."""
    cleaned = clean_texts(texts)
    latest = latest_for_role(db, role)
    if latest is not None and all(cleaned[lang] == latest.text_for(lang) for lang in LANGUAGES):
        # A new version makes every member accept again; the same words are not one.
        raise ObligationError(UNCHANGED)
    previous = latest.version if latest is not None else 0
    obligation = Obligation(role=role, version=previous + 1, text_ky=cleaned["ky"], text_ru=cleaned["ru"],
                            text_en=cleaned["en"], created_by=actor.ref[:128])
    db.add(obligation)
    db.flush()
    journal.record(
        db, actor=actor.ref, action="role:obligation:publish", subject=f"role:{role.name}",
        reason=(reason or "").strip() or None, ip=actor.ip, request_id=actor.request_id,
        details={"role": role.name, "version": obligation.version, "previous_version": previous or None,
                 "obligation_id": obligation.id},
    )
    return obligation
