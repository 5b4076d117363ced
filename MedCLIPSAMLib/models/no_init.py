"""Building a network without the random initialisation that its checkpoint overwrites anyway.

Random init is most of the cost of loading a model on a CPU (BiomedCLIP: ~1.8 of ~2.6 s in uniform_/normal_/
erfinv_). Under skip_init() every parameter registered by this thread is moved to the `meta` device, so the
init functions run on nothing; materialize() then gives each one real, uninitialised memory, and a strict
checkpoint load fills it. Buffers stay real: non-persistent ones (BERT's position_ids) are not in the
checkpoint and keep the values the constructor gave them. (A load then draws fewer random numbers: a
caller's torch RNG stream after it differs from before, as it did already with the loaders' reuse cache.)

The switch is thread-local (the service loads models on worker threads while other threads build modules):
Module.register_parameter is wrapped while any thread is inside skip_init() (counted under a lock, put back
when the last one leaves), and the wrapper does nothing in threads that are not inside it.
"""

import contextlib
import threading

_local = threading.local()
_install_lock = threading.Lock()
_original_register = None
_users = 0  # threads inside skip_init(); the wrapper is in place while there are any


def _register_parameter(module, name, param):
    import torch

    _original_register(module, name, param)
    twins = getattr(_local, "twins", None)
    # subclasses (a lazy module's UninitializedParameter) keep their own behaviour: left as they are
    if twins is None or type(param) is not torch.nn.Parameter or param.is_meta:
        return
    # the same parameter registered twice (tied weights) gets the same meta twin, so it stays tied
    if param not in twins:
        twins[param] = _empty_twin(param, "meta")
    module._parameters[name] = twins[param]


def _empty_twin(param, device):
    import torch

    twin = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
    twin.__dict__.update(param.__dict__)  # flags libraries set on a parameter
    return twin


def _install():
    """Wrap Module.register_parameter while any thread is inside skip_init() (counted)."""
    global _original_register, _users
    import torch

    with _install_lock:
        if _original_register is None:  # kept for good: a thread that just entered the wrapper still calls it
            _original_register = torch.nn.Module.register_parameter
        if _users == 0:
            torch.nn.Module.register_parameter = _register_parameter
        _users += 1


def _uninstall():
    global _users
    import torch

    with _install_lock:
        _users -= 1
        if _users == 0:
            torch.nn.Module.register_parameter = _original_register


@contextlib.contextmanager
def skip_init():
    """Parameters registered by this thread inside the block are on `meta` (shape and dtype, no data)."""
    from torch.utils.weak import WeakIdKeyDictionary

    _install()
    outer = getattr(_local, "twins", None)
    _local.twins = WeakIdKeyDictionary()
    try:
        yield
    finally:
        _local.twins = outer
        _uninstall()


def meta_leftovers(model):
    """Names of buffers and tensor attributes that ended up on `meta` (a constructor derived them from a
    parameter): such a model cannot be built without init, since the checkpoint may not restore them."""
    import torch

    found = [name for name, buf in model.named_buffers() if buf.is_meta]
    for prefix, module in model.named_modules():
        found += [f"{prefix}.{key}" for key, value in vars(module).items()
                  if isinstance(value, torch.Tensor) and value.is_meta]
    return found


def materialize(model, device):
    """Give every meta parameter real, uninitialised memory on `device` (shared ones stay shared)."""
    made = {}  # id -> (meta parameter, its replacement); the meta one is kept alive so its id stays unique
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = (param, _empty_twin(param, device))
                module._parameters[name] = made[id(param)][1]
    return model


def build_without_init(make, device, log=None):
    """make() under skip_init(), its parameters then real but uninitialised on `device`: the caller must load
    every weight (strictly) before use. None if the model cannot be built this way (the caller then builds
    it normally): make() failed on meta parameters, or a buffer was derived from a parameter."""
    try:
        with skip_init():
            model = make()
    except Exception as exc:  # e.g. a constructor that reads a parameter's value
        if log:
            log.debug("building without init failed (%s): building normally", exc)
        return None
    leftovers = meta_leftovers(model)
    if leftovers:
        if log:
            log.debug("building without init left %s on meta: building normally", leftovers[:3])
        return None
    return materialize(model, device)
