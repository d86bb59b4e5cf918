"""Importing this module registers every console area on the blueprint (one line each)."""

# The console's navigation follows the order of these imports, so they are not sorted.
# ruff: noqa: I001
from admin_ui import dashboard  # noqa: F401
from admin_ui import accounts  # noqa: F401
from admin_ui import apps  # noqa: F401
from admin_ui import roles  # noqa: F401
from admin_ui import restrictions  # noqa: F401
from admin_ui import classes  # noqa: F401
from admin_ui import roster  # noqa: F401
from admin_ui import directory  # noqa: F401
from admin_ui import audit  # noqa: F401
from admin_ui import sharing  # noqa: F401
from admin_ui import breach  # noqa: F401
from admin_ui import workdays  # noqa: F401
from admin_ui import privacy  # noqa: F401
