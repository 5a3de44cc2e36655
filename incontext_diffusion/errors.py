"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as one line and exits with code 2; anything else is a bug and keeps
its traceback. The message names the problem and the fix, e.g.
"recipe 'tiny_ldmm' not found: available recipes are tiny_ldm, ...".
"""


class UserError(Exception):
    """A problem with the user's input (file, recipe, option) that the user can fix."""
