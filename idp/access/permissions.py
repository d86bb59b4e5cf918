"""The one permission vocabulary and the seeded role -> permission sets (policy 5.1)."""

from __future__ import annotations

from flask_babel import lazy_gettext as _l

# Every permission the console and the admin API know, with a description people read.
PERMISSIONS: dict[str, object] = {
    "admin:users:read": _l("See accounts, classes and guardians"),
    "admin:users:write": _l("Create and edit accounts, classes and guardians"),
    "admin:roles:assign": _l("Give accounts roles (only roles whose permissions you hold)"),
    "admin:roles:write": _l("Create roles and change their permissions"),
    "support:accounts:lock": _l("Lock and unlock accounts"),
    "support:sessions:end": _l("End an account's sessions"),
    "support:credentials:reset": _l("Require a new password and issue activation codes"),
    "clients:read": _l("See portal apps and who has access to them"),
    "clients:write": _l("Register and edit portal apps, rotate their secrets"),
    "audit:read": _l("Read and export the audit journal"),
    "reports:read": _l("See the dashboard and reports"),
    "admin:restrictions:write": _l("Manage access restrictions"),
    "support:cases:handle": _l("Handle breach reports: the case queue, contact notes and case actions"),
    "privacy:data:export": _l("Produce a person's personal data export for their request"),
}

# Seeded roles; custom roles are stored in the database. Tech support can lock, end
# sessions and reset credentials but not touch roles; the security officer reads
# everything and manages roles and restrictions; the school admin manages accounts,
# classes and portal apps.
SEEDED_ROLE_PERMISSIONS: dict[str, set[str]] = {
    "student": set(),
    "teacher": set(),
    "parent": set(),
    "staff": set(),
    "tech_support": {
        "admin:users:read",
        "support:accounts:lock",
        "support:sessions:end",
        "support:credentials:reset",
        "support:cases:handle",
        "reports:read",
    },
    "security_officer": {
        "admin:users:read",
        "admin:roles:assign",
        "admin:roles:write",
        "admin:restrictions:write",
        "clients:read",
        "audit:read",
        "reports:read",
        "support:cases:handle",
        "privacy:data:export",
    },
    "school_admin": {
        "admin:users:read",
        "admin:users:write",
        "admin:roles:assign",
        "support:credentials:reset",
        "clients:read",
        "clients:write",
        "reports:read",
        "privacy:data:export",
    },
}

# Permissions added to seeded roles after their roles were first seeded (a database seeded
# before keeps its grants as they were): ``ensure_roles`` grants each to these seeded
# roles once, in a database where no role holds it yet. Once any role holds it, what the
# security officer changed stays changed.
LATER_SEEDED_PERMISSIONS: dict[str, set[str]] = {
    "support:cases:handle": {"tech_support", "security_officer"},
    "privacy:data:export": {"school_admin", "security_officer"},
}

# The permissions that open the console at all (any one of them).
CONSOLE_PERMISSIONS = set(PERMISSIONS)


# What people read for the seeded roles (the database keeps the English description).
SEEDED_ROLE_LABELS: dict[str, object] = {
    "student": _l("Student"),
    "teacher": _l("Teacher"),
    "parent": _l("Parent or guardian"),
    "staff": _l("School staff"),
    "tech_support": _l("Technical support"),
    "security_officer": _l("Information security officer"),
    "school_admin": _l("School administrator"),
}


def role_label(name: str) -> str:
    """A seeded role's translated label; a custom role's own name."""
    label = SEEDED_ROLE_LABELS.get(name)
    return str(label) if label is not None else name
