"""The error of data that cannot train: a UserError (exit 2) whose message starts with the key to fix.

Its own module, below the rest of tlray.data, because every step raises it: listing, the layouts,
the index's checks, and the decoding tasks (`dataset.on_bad_image: fail`).
"""

from __future__ import annotations

from tlray.errors import UserError


class DataError(UserError):
    pass
