"""Every model, imported in one place for Alembic and create_all."""

from connectors.ldap.models import DirectorySyncRun
from idp.access.models import Restriction, SharingFlag
from idp.accounts.models import (
    ActivationCode,
    GuardianLinkCode,
    Obligation,
    ObligationAcceptance,
    Passkey,
    RecoveryCode,
    Role,
    RolePermission,
    SchoolClass,
    User,
    class_members,
    guardian_links,
    user_roles,
)
from idp.audit.models import AuditEvent, AuditHead
from idp.breach.models import BreachCase, BreachCaseStep
from idp.db import Base
from idp.notify.models import OutboxMessage
from idp.oidc.models import (
    AccessToken,
    AuthorizationCode,
    BackchannelLogoutDelivery,
    Client,
    Consent,
    RefreshToken,
    SigningKey,
)
from idp.workdays.models import CalendarDay

__all__ = [
    "DirectorySyncRun",
    "GuardianLinkCode",
    "BreachCase",
    "BreachCaseStep",
    "CalendarDay",
    "BackchannelLogoutDelivery",
    "Restriction",
    "SharingFlag",
    "AccessToken",
    "OutboxMessage",
    "ActivationCode",
    "Obligation",
    "ObligationAcceptance",
    "Passkey",
    "RecoveryCode",
    "RolePermission",
    "SchoolClass",
    "class_members",
    "guardian_links",
    "AuditEvent",
    "AuditHead",
    "AuthorizationCode",
    "Base",
    "Client",
    "Consent",
    "RefreshToken",
    "Role",
    "SigningKey",
    "User",
    "user_roles",
]
