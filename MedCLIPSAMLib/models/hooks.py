"""Forward hooks that capture (or replace) a module's output, or capture its input, and can end the forward
pass right there: used by the saliency methods and by models/clip_image.py."""

import contextlib


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted activation is captured."""


@contextlib.contextmanager
def hooked(module, replace=None, stop=False, before=False):
    """Capture `module`'s output (before=True: its first input) in the yielded list; `replace(output)`
    substitutes the output; `stop` ends the forward pass right there (the caller wraps the call in
    `run_until`). The hook is always removed."""
    if before and replace is not None:
        raise ValueError("replace works on a module's output, not on its input")
    store = []

    def keep(value):
        store.append(value)
        if stop:
            raise _StopForward

    def output_hook(_module, _inputs, output):
        if replace is not None:
            output = replace(output)
        keep(output)
        return output

    handle = (module.register_forward_pre_hook(lambda _module, args: keep(args[0])) if before
              else module.register_forward_hook(output_hook))
    try:
        yield store
    finally:
        handle.remove()


def run_until(fn, *args):
    """Call fn(*args), treating a _StopForward from a hook as a normal end."""
    try:
        fn(*args)
    except _StopForward:
        pass
