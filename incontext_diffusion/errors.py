"""The one exception type for mistakes a user can fix, and the words for file-system failures.

The CLI prints a `UserError` as one line and exits with code 2; anything else is a bug and keeps
its traceback. The message names the problem and the fix, e.g.
"recipe 'tiny_ldmm' not found: available recipes are tiny_ldm, ...".
"""

from __future__ import annotations

import errno
import os

# What the user can do about each file-system failure they can fix.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk or write somewhere else",
    errno.EDQUOT: "free space in your quota or write somewhere else",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.EEXIST: "remove it, or choose another path",
    errno.ENOENT: "check the path and its spelling",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: name a file inside it",
    errno.ENOTEMPTY: "remove it, or choose another path",
}


class UserError(Exception):
    """A problem with the user's input (file, recipe, option) that the user can fix."""


def is_user_os_error(error: BaseException) -> bool:
    """An OSError the user can fix (disk full, permissions, missing or existing path)."""
    return isinstance(error, OSError) and error.errno in OS_ERROR_FIXES


def os_error_message(error: OSError, path: str | os.PathLike | None = None, doing: str = "cannot write") -> str:
    """One line for an OSError: what failed on which path, why, and the fix."""
    path = path if path is not None else error.filename
    reason = error.strerror or type(error).__name__
    where = f"{doing} '{path}'" if path is not None else doing
    return f"{where} ({reason}): {OS_ERROR_FIXES.get(error.errno, 'check the path and the disk')}"


def user_os_error(error: OSError, path: str | os.PathLike | None = None, doing: str = "cannot write") -> UserError:
    """The `UserError` for an OSError on a path the user named."""
    return UserError(os_error_message(error, path, doing))
