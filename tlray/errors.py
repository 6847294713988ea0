"""The one error type that means "the user's input is wrong" (exit code 2)."""


class UserError(Exception):
    """Bad input — spec, data or paths. The CLI prints the message, no traceback, and exits 2."""


def user_error_inside(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that Ray wrapped (task, actor and worker-group errors)."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError(X) is an X whose .cause is the original
        if isinstance(current, UserError) and not isinstance(cause, UserError):
            return current
        stack += [current.__cause__, current.__context__, cause]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    return None
