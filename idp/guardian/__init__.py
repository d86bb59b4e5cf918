"""The parents' side of guardian link codes (``/guardian``)."""
