"""What Darbaza needs to know about the school directory, from the ``IDP_LDAP_*`` settings
over a ready profile for OpenLDAP or Active Directory (README, "School directory")."""

from __future__ import annotations

from dataclasses import dataclass, field

from idp.config import Settings, SettingsError

PROFILES: dict[str, dict[str, object]] = {
    "openldap": {
        # inetOrgPerson people, groupOfNames groups (member = person DN), entryUUID as the
        # stable id, modifyTimestamp (generalized time) for incremental syncs. OpenLDAP
        # has no standard "disabled" flag: a person removed from the directory (or moved
        # out of the user base or filter) is disabled here by the next full sync.
        "person_filter": "(objectClass=inetOrgPerson)",
        "group_filter": "(objectClass=groupOfNames)",
        "group_member_attribute": "member",
        "member_of_attribute": "",
        "change_attribute": "modifyTimestamp",
        "attributes": {
            "login": "uid",
            "display_name": "cn",
            "email": "mail",
            "locale": "preferredLanguage",
            "external_id": "entryUUID",
        },
        "disabled_attribute": "",
    },
    "ad": {
        # Active Directory: sAMAccountName logins, objectGUID ids, memberOf on the person,
        # the ACCOUNTDISABLE bit (2) of userAccountControl, uSNChanged for incremental syncs.
        "person_filter": "(&(objectClass=user)(objectCategory=person))",
        "group_filter": "(objectClass=group)",
        "group_member_attribute": "member",
        "member_of_attribute": "memberOf",
        "change_attribute": "uSNChanged",
        "attributes": {
            "login": "sAMAccountName",
            "display_name": "displayName",
            "email": "mail",
            "locale": "preferredLanguage",
            "external_id": "objectGUID",
        },
        "disabled_attribute": "userAccountControl",
    },
}

FIELDS = ("login", "display_name", "email", "locale", "external_id")


@dataclass(frozen=True)
class DirectoryConfig:
    urls: tuple[str, ...]
    profile: str
    security: str  # none | ldaps | starttls
    ca_file: str
    bind_dn: str
    bind_password: str
    user_base: str
    group_base: str
    person_filter: str  # the profile's filter ANDed with IDP_LDAP_USER_FILTER
    group_filter: str
    group_member_attribute: str
    member_of_attribute: str  # "" (OpenLDAP): membership read from the groups
    change_attribute: str  # modifyTimestamp | uSNChanged
    disabled_attribute: str  # "" or userAccountControl
    attributes: dict[str, str] = field(default_factory=dict)  # Darbaza field -> attribute
    group_roles: dict[str, str] = field(default_factory=dict)  # group DN or cn (casefolded) -> role
    group_classes: dict[str, str] = field(default_factory=dict)  # group DN or cn (casefolded) -> class
    page_size: int = 500
    timeout: int = 5

    @property
    def configured(self) -> bool:
        return bool(self.urls)


def directory_config(settings: Settings) -> DirectoryConfig:
    """The directory configuration; raises ``SettingsError`` naming the bad setting."""
    profile_name = settings.ldap_profile.strip().lower()
    if profile_name not in PROFILES:
        raise SettingsError(f"IDP_LDAP_PROFILE must be one of {', '.join(PROFILES)}, not {settings.ldap_profile!r}")
    profile = PROFILES[profile_name]
    security = settings.ldap_security.strip().lower()
    if security not in {"none", "ldaps", "starttls"}:
        raise SettingsError("IDP_LDAP_SECURITY must be none, ldaps or starttls")
    attributes = dict(profile["attributes"])  # type: ignore[call-overload]
    for name, value in settings.ldap_attributes.items():
        if name not in FIELDS or not isinstance(value, str) or not value.strip():
            raise SettingsError(f"IDP_LDAP_ATTRIBUTES: unknown field or empty attribute: {name!r}")
        attributes[name] = value.strip()
    for setting, mapping in (("IDP_LDAP_GROUP_ROLES", settings.ldap_group_roles),
                             ("IDP_LDAP_GROUP_CLASSES", settings.ldap_group_classes)):
        if not all(isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip() for k, v in mapping.items()):
            raise SettingsError(f"{setting} must map group names or DNs to names (JSON strings)")
    if settings.ldap_urls and not settings.ldap_user_base.strip():
        raise SettingsError("IDP_LDAP_USER_BASE is needed when IDP_LDAP_URLS is set")
    if settings.ldap_page_size < 1 or settings.ldap_timeout_seconds < 1:
        raise SettingsError("IDP_LDAP_PAGE_SIZE and IDP_LDAP_TIMEOUT_SECONDS must be positive")
    person_filter = str(profile["person_filter"])
    extra = settings.ldap_user_filter.strip()
    if extra:
        if not (extra.startswith("(") and extra.endswith(")")):
            raise SettingsError("IDP_LDAP_USER_FILTER must be an LDAP filter in parentheses")
        person_filter = f"(&{person_filter}{extra})"
    return DirectoryConfig(
        urls=tuple(settings.ldap_urls),
        profile=profile_name,
        security=security,
        ca_file=settings.ldap_ca_file,
        bind_dn=settings.ldap_bind_dn,
        bind_password=settings.ldap_bind_password,
        user_base=settings.ldap_user_base.strip(),
        group_base=(settings.ldap_group_base or settings.ldap_user_base).strip(),
        person_filter=person_filter,
        group_filter=str(profile["group_filter"]),
        group_member_attribute=str(profile["group_member_attribute"]),
        member_of_attribute=str(profile["member_of_attribute"]),
        change_attribute=str(profile["change_attribute"]),
        disabled_attribute=str(profile["disabled_attribute"]),
        attributes=attributes,
        group_roles={k.strip().casefold(): v.strip() for k, v in settings.ldap_group_roles.items()},
        group_classes={k.strip().casefold(): v.strip().upper() for k, v in settings.ldap_group_classes.items()},
        page_size=settings.ldap_page_size,
        timeout=settings.ldap_timeout_seconds,
    )
