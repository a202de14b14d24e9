"""The user's own code on Ray workers: what must travel by value because a worker can't import it.

A driver script's eval_func, a test's dataset class or a plug-in adaptor defined beside the
script are pickled by reference (module and name) by default, which fails on a worker whose path
lacks the user's folder. Registering their modules with cloudpickle sends them by value instead.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import Any

from .worker import WorkerJob


def ship_user_code_by_value(job: WorkerJob) -> None:
    """Let workers unpickle the user's eval_func, dataset and plug-in classes from a script or test.

    Modules installed in site-packages are importable everywhere; a user's own module (a driver
    script's neighbour, a test file) may not be on a worker's path, so it travels by value, and
    so do the user's modules its functions call (``from my_helpers import accuracy``).
    """
    import ray.cloudpickle

    paths = sysconfig.get_paths()
    installed = {paths["purelib"], paths["platlib"], paths["stdlib"]}
    dataset = getattr(job.evaluation.dataloader, "dataset", None)
    for module in _modules_of((job.evaluation.eval_func, job.evaluation.dataloader, dataset, job.adaptor, job.q_func)):
        path = getattr(module, "__file__", None)
        if path is None or module.__name__ == "__main__":
            continue
        if not any(os.path.abspath(path).startswith(root) for root in installed):
            ray.cloudpickle.register_pickle_by_value(module)


def _modules_of(objects: tuple) -> list:
    """The modules defining ``objects`` and the functions and classes their functions refer to
    (by global name or closure), followed through the user's code; lpot_ray's own modules are
    installed on every worker and left out."""
    modules: list = []
    seen: set[int] = set()
    pending = list(objects)
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        module = sys.modules.get(getattr(obj, "__module__", None) or type(obj).__module__)
        if module is None or module.__name__ == "lpot_ray" or module.__name__.startswith("lpot_ray."):
            continue
        if module not in modules:
            modules.append(module)
        code = getattr(obj, "__code__", None)
        if code is not None:  # a function: what it calls by name, and what it closes over
            names = getattr(obj, "__globals__", {})
            pending += [names[name] for name in code.co_names if callable(names.get(name))]
            pending += [value for value in map(_cell_value, obj.__closure__ or ()) if callable(value)]
    return modules


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None
